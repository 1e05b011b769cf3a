// The libvirt hook's entry point (hooks/libvirt-qemu runs dist/hook.mjs, bundled from this
// file by scripts/build-cli.sh, or this file through tsx). hook.ts only defines the hook, so
// that the CLI can import it without running it.
import { main } from './hook.ts';

await main();
