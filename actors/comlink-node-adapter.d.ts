// comlink ships its Node adapter as ESM (dist/esm/node-adapter.mjs) with its types only beside
// the UMD build; this names them for the ESM file the runtime loads.
declare module 'comlink/dist/esm/node-adapter.mjs' {
  import type { Endpoint } from 'comlink';
  import type { MessagePort } from 'node:worker_threads';
  export default function nodeEndpoint(port: MessagePort): Endpoint;
}
