// The argument conventions every mlora command shares: -h/--help prints the command's usage on
// stdout and exits 0; a usage error prints `mlora <command>: <what is wrong>`, a blank line and
// the usage on stderr and exits 2 (a failure while running exits 1, see scripts/mlora.ts).
import { parseArgs, type ParseArgsConfig } from 'node:util';

/** A command as its argument errors name it: `mlora <name>: ...`, then its usage. */
export interface Command {
  name: string;
  usage: string;
}

type Options = NonNullable<ParseArgsConfig['options']>;
const HELP = { help: { type: 'boolean', short: 'h' } } as const;

/** Reports a usage error of `cmd` on stderr; returns the exit status 2. */
export function usageError(cmd: Command, message: string): 2 {
  console.error(`mlora ${cmd.name}: ${message}\n\n${cmd.usage}`);
  return 2;
}

/**
 * parseArgs (strict) with -h/--help added to `options`: the parsed arguments, or the exit
 * status when there is nothing left to do (0: the usage was asked for and shown; 2: an unknown
 * option or a missing value, reported).
 */
export function parseCommandArgs<const O extends Options, const P extends boolean = false>(
  cmd: Command,
  argv: string[],
  options: O,
  allowPositionals = false as P,
):
  | ReturnType<typeof parseArgs<{ args: string[]; options: O & typeof HELP; allowPositionals: P; strict: true }>>
  | 0
  | 2 {
  let a;
  try {
    a = parseArgs({ args: argv, options: { ...options, ...HELP }, allowPositionals, strict: true });
  } catch (e) {
    return usageError(cmd, (e as Error).message);
  }
  if ((a.values as { help?: boolean }).help) {
    console.log(cmd.usage);
    return 0;
  }
  return a;
}

export type NumberKind = 'positive integer' | 'non-negative integer' | 'non-negative number';

/** The number an option's text says (`fallback` when the option is absent); undefined where it is not a `kind`. */
export function numberOption(raw: string | undefined, fallback: number, kind: NumberKind): number | undefined {
  const n = raw === undefined ? fallback : Number(raw);
  const ok = kind === 'non-negative number' ? Number.isFinite(n) : Number.isInteger(n);
  return ok && n >= (kind === 'positive integer' ? 1 : 0) ? n : undefined;
}

/** The usage error of a numeric option whose text is not a `kind`. */
export function badNumber(cmd: Command, name: string, raw: string | undefined, kind: NumberKind): 2 {
  return usageError(cmd, `--${name} must be a ${kind}, got '${raw}'`);
}
