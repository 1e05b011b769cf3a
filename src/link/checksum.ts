// CRC-32 over a header and a payload. zlib's crc32 of a buffer with no memory behind it
// returns 0 instead of the running value (zlib treats a NULL buffer as "start over"), and a
// zero-length Buffer may have none: so an empty payload is skipped, not summed.
import { crc32 } from 'node:zlib';

export function checksum(header: Buffer, payload: Buffer, seed = 0): number {
  const h = crc32(header, seed);
  return payload.length ? crc32(payload, h) : h;
}
