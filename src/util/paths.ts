// Where this checkout lives, found from the running module: the same answer whether the
// code runs from src/ through tsx or from the bundle in dist/ (see scripts/build-cli.sh).
import { existsSync, readFileSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';

function findRoot(): string {
  let dir = dirname(fileURLToPath(import.meta.url));
  for (let i = 0; i < 6; i++) {
    const pkg = join(dir, 'package.json');
    if (existsSync(pkg) && (JSON.parse(readFileSync(pkg, 'utf8')) as { name?: string }).name === 'vmshift') return dir;
    dir = dirname(dir);
  }
  throw new Error(`cannot find vmshift's package.json above ${fileURLToPath(import.meta.url)}`);
}

export const projectRoot = findRoot();
/** The vmshift CLI of this checkout (what daemons and attach spawn). */
export const vmshiftBin = join(projectRoot, 'bin/vmshift');
