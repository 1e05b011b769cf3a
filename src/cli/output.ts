// How the CLI talks to people and scripts: human lines on a terminal, one JSON document (or
// JSON lines for events) with --json. Exit codes: 0 done, 1 failed, 2 bad usage, 130
// interrupted by Ctrl-C (what was interrupted was undone: e.g. a move aborted on its source).
export const EXIT_OK = 0;
export const EXIT_FAILED = 1;
export const EXIT_USAGE = 2;
export const EXIT_INTERRUPTED = 130;

export class UsageError extends Error {
  override name = 'UsageError';
}

export function printJson(value: unknown): void {
  process.stdout.write(JSON.stringify(value) + '\n');
}

export function fail(err: unknown, json: boolean): never {
  const e = err as { code?: string; message?: string };
  const usage = err instanceof UsageError;
  if (json) printJson({ error: { code: usage ? 'usage' : (e.code ?? 'failed'), message: e.message ?? String(err) } });
  else process.stderr.write(`vmshift: ${e.message ?? String(err)}\n`);
  process.exit(usage ? EXIT_USAGE : EXIT_FAILED);
}
