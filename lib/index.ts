// The public API of the mlora package.
export { native, addonPath } from './native.js';
export { ErrorCode, MloraError, errorCode } from './errors.js';
export type { Op, LoraSegmentArg, NativeInfo, DeviceOptions, MemoryInfo } from './native.js';
export * from './tensor.js';
export { Rng, deriveSeed } from './rng.js';
export * from './data/index.js';
