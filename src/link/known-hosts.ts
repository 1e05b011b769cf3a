// Host key verification against an OpenSSH known_hosts file, for the ssh2 carrier (ssh2
// itself accepts any key). Supports what ssh-keygen and ssh write: plain and hashed
// (`|1|salt|hmac`) host fields, `[host]:port` for other ports, comma lists, `*`/`?` globs,
// `!` negations and `@revoked`. `@cert-authority` lines are skipped (no certificates here).
import { createHash, createHmac } from 'node:crypto';
import { readFileSync } from 'node:fs';
import { LinkError } from './errors.ts';

export function fingerprint(keyBlob: Buffer): string {
  return `SHA256:${createHash('sha256').update(keyBlob).digest('base64').replace(/=+$/, '')}`;
}

/** The key type named inside an SSH public key blob (string length + name). */
export function keyType(keyBlob: Buffer): string {
  if (keyBlob.length < 4) return 'unknown';
  const n = keyBlob.readUInt32BE(0);
  return keyBlob.subarray(4, 4 + n).toString('latin1');
}

function hostField(host: string, port: number): string {
  return port === 22 ? host : `[${host}]:${port}`;
}

function glob(pattern: string, s: string): boolean {
  const re = new RegExp(`^${pattern.replace(/[.+^${}()|[\]\\]/g, '\\$&').replace(/\*/g, '.*').replace(/\?/g, '.')}$`, 'i');
  return re.test(s);
}

function matchesHost(field: string, name: string): boolean {
  if (field.startsWith('|1|')) {
    const [, , salt, hash] = field.split('|');
    if (!salt || !hash) return false;
    return createHmac('sha1', Buffer.from(salt, 'base64')).update(name).digest('base64') === hash;
  }
  let hit = false;
  for (const p of field.split(',')) {
    if (p.startsWith('!')) { if (glob(p.slice(1), name)) return false; }
    else if (glob(p, name)) hit = true;
  }
  return hit;
}

/**
 * Throws a HOST_KEY LinkError unless `keyBlob` is a key the known_hosts file lists for
 * host:port. The message names the host, the key's type and fingerprint, and the file.
 */
export function verifyHostKey(file: string, host: string, port: number, keyBlob: Buffer): void {
  const name = hostField(host, port);
  const fp = fingerprint(keyBlob);
  const type = keyType(keyBlob);
  let text: string;
  try {
    text = readFileSync(file, 'utf8');
  } catch (e) {
    throw new LinkError('HOST_KEY', `ssh: cannot read known_hosts ${file} (${(e as Error).message}); refusing ${name}, which offers ${type} ${fp}`);
  }
  const known: string[] = [];
  for (const raw of text.split('\n')) {
    const line = raw.trim();
    if (!line || line.startsWith('#')) continue;
    const parts = line.split(/\s+/);
    let marker = '';
    if (parts[0].startsWith('@')) marker = parts.shift()!;
    if (parts.length < 3 || !matchesHost(parts[0], name)) continue;
    if (marker === '@cert-authority') continue;
    let blob: Buffer;
    try { blob = Buffer.from(parts[2], 'base64'); } catch { continue; }
    const same = blob.equals(keyBlob);
    if (marker === '@revoked') {
      if (same) throw new LinkError('HOST_KEY', `ssh: host key of ${name} (${type} ${fp}) is marked @revoked in ${file}`);
      continue;
    }
    if (same) return;
    known.push(`${parts[1]} ${fingerprint(blob)}`);
  }
  if (known.length) {
    throw new LinkError('HOST_KEY', `ssh: HOST KEY MISMATCH for ${name}: it offers ${type} ${fp}, but ${file} lists ${known.join(', ')}; refusing (someone may be in the middle, or the host was reinstalled)`);
  }
  throw new LinkError('HOST_KEY', `ssh: host ${name} is unknown: it offers ${type} ${fp}, which is not in ${file}; refusing (add the key after checking its fingerprint)`);
}
