// Errors that carry a code. A failure that crosses a thread (a stage worker to the runtime, the
// native addon to JavaScript) is told apart by its code, never by matching its message text.

/** The codes the project sets. The native addon sets ERR_MLORA_OOM (native/src/core/device.h). */
export const ErrorCode = {
  /** A device (or the host) could not allocate: the budget, the allocator or the driver said no. */
  OutOfMemory: 'ERR_MLORA_OOM',
  /** Data arrived damaged (a shared-memory slot whose header or checksum does not match). */
  Corrupt: 'ERR_MLORA_CORRUPT',
  /** A stage could not start or its thread ended. */
  Crash: 'ERR_MLORA_CRASH',
  /** A caller passed arguments the callee refuses (an op's argument checks). */
  BadInput: 'ERR_MLORA_BAD_INPUT',
  /** A stage did not answer a request: it died, hangs (no answer in time) or a recovery interrupted the call. */
  Unavailable: 'ERR_MLORA_UNAVAILABLE',
} as const;
export type ErrorCode = (typeof ErrorCode)[keyof typeof ErrorCode];

export class MloraError extends Error {
  override name = 'MloraError';
  constructor(
    readonly code: ErrorCode,
    message: string,
    options?: ErrorOptions,
  ) {
    super(message, options);
  }
}

/** The code of any error: a MloraError's, or the `code` the native addon (or Node) set. */
export function errorCode(e: unknown): string | undefined {
  const c = e !== null && typeof e === 'object' ? (e as { code?: unknown }).code : undefined;
  return typeof c === 'string' ? c : undefined;
}

/** An error as it travels in a message between threads (structured clone keeps neither class nor code reliably). */
export interface WireError {
  code?: string;
  message: string;
}

export function toWire(e: unknown, prefix = ''): WireError {
  const code = errorCode(e);
  const message = prefix + (e instanceof Error ? e.message : String(e));
  return code !== undefined ? { code, message } : { message };
}

/** The error again on the receiving side, its message prefixed (which stage, which call), its code kept. */
export function fromWire(w: WireError, prefix = ''): Error {
  const message = prefix + w.message;
  if ((Object.values(ErrorCode) as string[]).includes(w.code ?? ''))
    return new MloraError(w.code as ErrorCode, message);
  return w.code !== undefined ? Object.assign(new Error(message), { code: w.code }) : new Error(message);
}
