// Errors of the link, with stable codes callers switch on (undici's way).
export type LinkErrorCode =
  | 'PROTOCOL' // a peer broke the frame state table
  | 'CHECKSUM' // a frame or record failed its checksum
  | 'MISMATCH' // a peer or file belongs to another link or migration
  | 'HOST_KEY' // SSH host key unknown or different from known_hosts
  | 'AUTH' // SSH key refused, or TLS certificate not verified
  | 'UNREACHABLE' // no carrier delivered anything for the hold time
  | 'ABORTED' // the link was given up on purpose (either side)
  | 'FILE'; // a shared-dir file could not be used

export class LinkError extends Error {
  constructor(readonly code: LinkErrorCode, message: string) {
    super(message);
    this.name = 'LinkError';
  }
}

/** Errors that mean "do not redial: it will fail the same way". */
export function isFatal(e: unknown): boolean {
  return e instanceof LinkError && (e.code === 'MISMATCH' || e.code === 'HOST_KEY' || e.code === 'AUTH' || e.code === 'ABORTED');
}

/** A carrier marks a raw socket error with what it means for the link (see `meaning`). */
export function classify(raw: Error, meant: Error): void {
  if (meant !== raw) (raw as Error & { linkMeaning?: Error }).linkMeaning = meant;
}

export function meaning(e: Error): Error {
  return (e as Error & { linkMeaning?: Error }).linkMeaning ?? e;
}
