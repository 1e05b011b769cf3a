// Where vmshiftd lives on a host unless told otherwise (the CLI needs these without loading
// the daemon itself).
export const DEFAULT_SOCKET = '/run/vmshift/vmshiftd.sock';
export const DEFAULT_STATE_DIR = '/var/lib/vmshift';
export const DEFAULT_RUN_DIR = '/run/vmshift';
export const DEFAULT_DAEMON_CONFIG = '/etc/vmshift/vmshiftd.json';

/** The run directory: the flag, else $VMSHIFT_RUN_DIR, else the default. */
export function runDir(flag?: string): string {
  return flag || process.env.VMSHIFT_RUN_DIR || DEFAULT_RUN_DIR;
}
