// mlora info: what the native core can do on this machine.
import { native, addonPath } from '../../lib/native.js';

export async function main(argv: string[]): Promise<number> {
  const info = native().info();
  if (argv.includes('--json')) {
    console.log(JSON.stringify({ addon: addonPath(), ...info }, null, 2));
    return 0;
  }
  console.log(`addon      ${addonPath()}`);
  console.log(
    `cpu        ${info.cpu.hardwareThreads} threads, avx2 ${info.cpu.avx2}, avx512f ${info.cpu.avx512f}, ` +
      `avx512bf16 ${info.cpu.avx512bf16}, gemm kernel ${info.cpu.gemmKernel}`,
  );
  console.log(
    `cuda       ${info.cuda.compiled ? 'compiled' : 'not compiled'}, ${info.cuda.devices} device(s)${info.cuda.reason ? ` (${info.cuda.reason})` : ''}`,
  );
  if (info.cuda.compiled) console.log(`cuda gemm  ${info.cuda.gemm}`);
  console.log(`ops        ${info.ops.join(' ')}`);
  return 0;
}
