// `npm run bench -- NAME [options]`: runs one benchmark; each compares vmshift with QEMU,
// qemu-nbd and nbdkit on the same work in the same run and prints ratios.
const benches: Record<string, () => Promise<{ main(args: string[]): Promise<void> }>> = {
  shim: () => import('./shim.ts'),
  migrate: () => import('./migrate.ts'),
  thin: () => import('./thin.ts'),
  restart: () => import('./restart.ts'),
  host: () => import('./host.ts'),
  memory: () => import('./memory.ts'),
  'memory-cache': () => import('./memory-cache.ts'),
  'cache-codec': () => import('./cache-codec.ts'),
  startup: () => import('./startup.ts'),
  'link-file': () => import('./link-file.ts'),
};

const [name, ...rest] = process.argv.slice(2);
if (!name || !benches[name]) {
  process.stderr.write(`usage: npm run bench -- <${Object.keys(benches).join('|')}> [options]\n`);
  process.exit(2);
}
const mod = await benches[name]!();
await mod.main(rest);
