// The cache's two halves as Node streams for the relays: the encoder between the source
// QEMU's socket and the link, the decoder between the link and the destination QEMU's socket.
// One write per input chunk (the frames of a chunk are joined): the link frames each write.
import { Transform } from 'node:stream';
import { CacheDecoder } from './decoder.ts';
import { CacheEncoder, type EncoderOptions } from './encoder.ts';

export function encoderStream(o: EncoderOptions): { stream: Transform; encoder: CacheEncoder } {
  const encoder = new CacheEncoder(o);
  const stream = new Transform({
    transform(chunk: Buffer, _enc, cb) {
      try {
        const f = encoder.encode(chunk);
        if (f.length) this.push(f.length === 1 ? f[0] : Buffer.concat(f));
        cb();
      } catch (e) { cb(e as Error); }
    },
    flush(cb) {
      try {
        const f = encoder.finish();
        if (f.length) this.push(Buffer.concat(f));
        cb();
      } catch (e) { cb(e as Error); }
    },
  });
  return { stream, encoder };
}

export function decoderStream(): { stream: Transform; decoder: CacheDecoder } {
  const decoder = new CacheDecoder();
  const stream = new Transform({
    transform(chunk: Buffer, _enc, cb) {
      const out = decoder.push(chunk);
      if (out.length) this.push(Buffer.concat(out));
      cb(decoder.error ?? undefined);
    },
    flush(cb) {
      cb(decoder.end() ?? undefined);
    },
  });
  return { stream, decoder };
}
