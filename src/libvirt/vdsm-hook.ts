// oVirt VDSM hooks. VDSM runs every executable in /usr/libexec/vdsm/hooks/HOOKNAME/ with
// `_hook_domxml` naming a file that holds the domain XML, and a VM's custom properties as
// environment variables. Exit 0 is success; exit 2 fails the VM operation (1 is only logged).
//   before_vm_start   with custom property `vmshift=vda,vdb` (or `vmshift=all`): rewrite
//                     those disks in the XML file, in place, to go through vmshift shims, and
//                     start the shims through vmshiftd; refuse the start (exit 2) if that fails.
//                     Each NBD source asks QEMU to reconnect (`reconnectDelay` in hooks.json)
//   after_vm_destroy  stop the shims of a domain whose XML has vmshift enabled
// Like the libvirt hook, these talk only to vmshiftd, never to libvirt.
import { readFile, writeFile } from 'node:fs/promises';
import { pathToFileURL } from 'node:url';
import { daemonSocket } from '../cli/daemon-client.ts';
import { enableShim, isEnabled, listDisks } from './domain-xml.ts';
import { loadHookConfig } from './hook-config.ts';
import { MAX_XML_BYTES } from './hook.ts';
import { defaultGroup, startShims, stopShims } from './shim-control.ts';
import { domainIdentity, planShims, runDir, shimName, shimSocket } from './shim-plan.ts';

export const EXIT_FAIL_VM = 2;

async function readDomxml(env: NodeJS.ProcessEnv): Promise<{ path: string; xml: string }> {
  const path = env._hook_domxml;
  if (!path) throw new Error('_hook_domxml is not set: not called by VDSM?');
  const xml = await readFile(path, 'utf8');
  if (Buffer.byteLength(xml) > MAX_XML_BYTES) throw new Error(`${path}: domain XML larger than ${MAX_XML_BYTES} bytes`);
  return { path, xml };
}

/** The disks named by the `vmshift` custom property; `all` means every file and block disk. */
export function chosenDisks(property: string, xml: string): string[] {
  const wanted = property.split(',').map((s) => s.trim()).filter(Boolean);
  if (wanted.length === 1 && wanted[0] === 'all') {
    return listDisks(xml).filter((d) => d.device === 'disk' && (d.type === 'file' || d.type === 'block')).map((d) => d.target);
  }
  return wanted;
}

export async function beforeVmStart(env: NodeJS.ProcessEnv, log: (line: string) => void): Promise<number> {
  const property = env.vmshift?.trim();
  if (!property) return 0;
  try {
    const { path, xml } = await readDomxml(env);
    const config = await loadHookConfig();
    let next = xml;
    if (!isEnabled(xml)) {
      const { domain, uuid } = domainIdentity(xml);
      const dir = runDir(config.runDir);
      next = enableShim(xml, {
        disks: chosenDisks(property, xml),
        socketFor: (dev) => shimSocket(dir, shimName(domain, uuid, dev)),
        exportName: (dev) => dev,
        // QEMU holds the guest's I/O while vmshiftd restarts a shim, where libvirt knows
        // <reconnect delay> (not 9.0: it drops the element; docs/ovirt.md).
        reconnectDelay: config.reconnectDelay,
      });
    }
    const plan = planShims(next)!;
    const socket = daemonSocket(config.daemonSocket);
    try {
      for (const l of await startShims(plan, socket, await defaultGroup(config.group))) log(l);
    } catch (e) {
      await stopShims(plan, socket).catch(() => {});
      throw e;
    }
    // Only once the shims serve: a VM must not start on sockets nobody listens on.
    if (next !== xml) await writeFile(path, next);
    return 0;
  } catch (e) {
    log(`refused: ${(e as Error).message}`);
    return EXIT_FAIL_VM;
  }
}

export async function afterVmDestroy(env: NodeJS.ProcessEnv, log: (line: string) => void): Promise<number> {
  try {
    const { xml } = await readDomxml(env);
    const plan = planShims(xml);
    if (!plan) return 0;
    const config = await loadHookConfig();
    for (const l of await stopShims(plan, daemonSocket(config.daemonSocket))) log(l);
  } catch (e) {
    // The VM is gone either way; failing here would only hide it from VDSM's bookkeeping.
    log(`warning: ${(e as Error).message}`);
  }
  return 0;
}

async function main(): Promise<void> {
  const which = process.argv[2];
  const log = (line: string) => process.stderr.write(`vmshift ${which}: ${line}\n`);
  if (which === 'before_vm_start') process.exitCode = await beforeVmStart(process.env, log);
  else if (which === 'after_vm_destroy') process.exitCode = await afterVmDestroy(process.env, log);
  else {
    log('usage: vdsm-hook.ts before_vm_start|after_vm_destroy');
    process.exitCode = EXIT_FAIL_VM;
  }
}

if (process.argv[1] && import.meta.url === pathToFileURL(process.argv[1]).href) await main();
