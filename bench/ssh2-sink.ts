// Throughput of one ssh2 exec channel (`cat > /dev/null` on the peer), for comparison with
// the OpenSSH client on the same sshd: `node --import tsx bench/ssh2-sink.ts HOST PORT KEY [MiB] [cipher]`
// (run inside a network namespace; see bench/link-carriers.ts).
import { Client } from 'ssh2';
import { readFileSync } from 'node:fs';

const [host, port, key, mib = '256', cipher] = process.argv.slice(2);
const c = new Client();
c.on('ready', () => {
  c.exec('cat > /dev/null', (err, ch) => {
    if (err) throw err;
    const t = performance.now();
    const buf = Buffer.alloc(64 * 1024);
    const total = Number(mib) * 1024 * 1024;
    let sent = 0;
    const go = () => {
      while (sent < total) {
        sent += buf.length;
        if (!ch.write(buf)) { ch.once('drain', go); return; }
      }
      ch.end();
    };
    ch.on('exit', () => {
      const ms = performance.now() - t;
      console.log(JSON.stringify({ carrier: 'ssh2', cipher: cipher ?? 'default', mib: Number(mib), ms: Math.round(ms), mibps: Math.round(Number(mib) / (ms / 1000)) }));
      c.end();
    });
    ch.resume();
    go();
  });
}).connect({
  host, port: Number(port), username: 'root', privateKey: readFileSync(key), hostVerifier: () => true,
  algorithms: cipher ? { cipher: [cipher as never] } : undefined,
});
