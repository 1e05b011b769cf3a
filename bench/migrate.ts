// Placeholder until the storage-migration benchmark lands.
export async function main(): Promise<void> {
  throw new Error('bench migrate: not written yet');
}
