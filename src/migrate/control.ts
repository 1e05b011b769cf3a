// Placeholder: the storage-migration engineer registers migrate.* methods on a shim here.
import type { Shim } from '../shim/shim.ts';

export function registerMigrationMethods(_shim: Shim): void {}
