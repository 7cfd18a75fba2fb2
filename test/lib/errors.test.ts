// Errors keep their code across a thread boundary: what a stage sends (toWire) comes back on the
// runtime's side (fromWire) with the same code and the message prefixed, whatever its class was.
import t from 'tap';
import { Worker } from 'node:worker_threads';
import { ErrorCode, MloraError, errorCode, fromWire, toWire, type WireError } from '../../lib/errors.js';

t.test('toWire and fromWire keep the code and the message', async (t) => {
  const oom = fromWire(toWire(new MloraError(ErrorCode.OutOfMemory, 'device cpu:1: out of memory')), 'stage 1: ');
  t.ok(oom instanceof MloraError, 'a known code comes back as a MloraError');
  t.equal(errorCode(oom), ErrorCode.OutOfMemory);
  t.equal(oom.message, 'stage 1: device cpu:1: out of memory');
  const node = fromWire(toWire(Object.assign(new Error('no such file'), { code: 'ENOENT' })));
  t.equal(errorCode(node), 'ENOENT', 'a foreign code is kept too');
  t.notOk(node instanceof MloraError);
  const plain = fromWire(toWire(new Error('bad')));
  t.equal(errorCode(plain), undefined, 'no code: none is made up');
  t.same(toWire('a string'), { message: 'a string' });
});

// (postMessage's structured clone of an Error keeps neither its subclass nor, in Node 20, its code)
t.test('the wire form survives postMessage', async (t) => {
  const src = `const { parentPort } = require('node:worker_threads');
    const e = Object.assign(new Error('out of memory'), { code: '${ErrorCode.OutOfMemory}' });
    parentPort.postMessage({ wire: { code: e.code, message: e.message } });`;
  const w = new Worker(src, { eval: true });
  const m = await new Promise<{ wire: WireError }>((resolve) => w.once('message', resolve));
  await w.terminate();
  t.equal(errorCode(fromWire(m.wire)), ErrorCode.OutOfMemory);
  t.equal(m.wire.message, 'out of memory');
});
