// The CLI's verbs (src/cli/main.ts), in help order: each verb's name, and the module and
// export that define it. A run that names a verb loads only that verb's module (and its packages): `vmshift migrate`
// then starts without the libvirt, daemon, attach and storage code (docs/performance.md,
// "Start-up"). Help without a verb, or an unknown verb, loads them all.
export type Verbs = Record<string, unknown>;
export const VERBS: Array<[string, () => Promise<Verbs>, string]> = [
  ['serve', () => import('./serve.ts'), 'serveCommand'],
  ['status', () => import('./status.ts'), 'statusCommand'],
  ['migrate-storage', () => import('./migrate-storage.ts'), 'migrateStorageCommand'],
  ['migrate', () => import('./migrate-memory.ts'), 'migrateMemoryCommand'],
  ['abort', () => import('./abort.ts'), 'abortCommand'],
  ['attach', () => import('./attach.ts'), 'attachCommand'],
  ['detach', () => import('./attach.ts'), 'detachCommand'],
  ['daemon', () => import('./vmshiftd.ts'), 'daemonCommand'],
  ['shim-start', () => import('./shim-verbs.ts'), 'shimStartCommand'],
  ['shim-stop', () => import('./shim-verbs.ts'), 'shimStopCommand'],
  ['restart', () => import('./shim-verbs.ts'), 'restartCommand'],
  ['list', () => import('./shim-verbs.ts'), 'listCommand'],
  ['enable', () => import('./libvirt-verbs.ts'), 'enableCommand'],
  ['disable', () => import('./libvirt-verbs.ts'), 'disableCommand'],
  ['balloon', () => import('./balloon.ts'), 'balloonCommand'],
];
