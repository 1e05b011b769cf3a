// Throughput of one ssh2 exec channel, for comparison with the OpenSSH client and with the
// link on the same sshd: `node --import tsx bench/ssh2-sink.ts HOST PORT KEY [MiB] [cipher] [sink|echo]`
// sink: `cat > /dev/null` on the peer (one way); echo: `cat` on the peer, every byte read
// back (both directions at once, MiB/s counts both). Run inside a network namespace (see
// bench/link-carriers.ts).
import { Client, type ClientChannel } from 'ssh2';
import { readFileSync } from 'node:fs';

const cpuMs = (u: NodeJS.CpuUsage) => Math.round((u.user + u.system) / 1000);
const [host, port, key, mib = '256', cipher, mode = 'sink'] = process.argv.slice(2);
const total = Number(mib) * 1024 * 1024;
const c = new Client();
c.on('ready', () => {
  c.exec(mode === 'echo' ? 'cat' : 'cat > /dev/null', (err, ch: ClientChannel) => {
    if (err) throw err;
    const t = performance.now();
    const cpu0 = process.cpuUsage();
    const buf = Buffer.alloc(64 * 1024);
    let sent = 0, got = 0;
    const go = () => {
      while (sent < total) {
        sent += buf.length;
        if (!ch.write(buf)) { ch.once('drain', go); return; }
      }
      ch.end();
    };
    const report = () => {
      const ms = performance.now() - t;
      const moved = mode === 'echo' ? 2 * Number(mib) : Number(mib);
      console.log(JSON.stringify({ carrier: 'ssh2', cipher: cipher ?? 'default', mode, mib: Number(mib), ms: Math.round(ms), mibps: Math.round(moved / (ms / 1000)), cpuMs: cpuMs(process.cpuUsage(cpu0)) }));
      c.end();
    };
    if (mode === 'echo') ch.on('data', (b: Buffer) => { got += b.length; if (got === total) report(); });
    else { ch.on('exit', report); ch.resume(); }
    go();
  });
}).connect({
  host, port: Number(port), username: 'root', privateKey: readFileSync(key), hostVerifier: () => true,
  algorithms: cipher ? { cipher: [cipher as never] } : undefined,
});
