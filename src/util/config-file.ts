// Configuration files root acts on (/etc/vmshift/*.json): read only when root owns them and
// nobody else may write them (src/util/trusted-fs.ts), parsed and validated with a schema;
// an absent file is the schema's defaults. Every error names the file.
import type { z } from 'zod';
import { readTrustedFile } from './trusted-fs.ts';

export async function loadConfigFile<S extends z.ZodTypeAny>(path: string, schema: S): Promise<z.output<S>> {
  let data: Buffer | undefined;
  try {
    data = await readTrustedFile(path);
  } catch (e) {
    throw new Error(`${path}: ${(e as Error).message}`);
  }
  let raw: unknown = {};
  if (data !== undefined) {
    try {
      raw = JSON.parse(data.toString('utf8'));
    } catch (e) {
      throw new Error(`${path}: not JSON: ${(e as Error).message}`);
    }
  }
  const parsed = schema.safeParse(raw);
  if (!parsed.success) {
    const i = parsed.error.issues[0]!;
    throw new Error(`${path}: ${i.path.join('.') || 'top level'}: ${i.message}`);
  }
  return parsed.data;
}
