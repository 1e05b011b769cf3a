// Where vmshiftd lives on a host unless told otherwise (the CLI needs these without loading
// the daemon itself).
export const DEFAULT_SOCKET = '/run/vmshift/vmshiftd.sock';
export const DEFAULT_STATE_DIR = '/var/lib/vmshift';
export const DEFAULT_RUN_DIR = '/run/vmshift';
