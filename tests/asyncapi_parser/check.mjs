// Parses an AsyncAPI document (a file, or stdin) with the reference parser and prints its
// diagnostics as JSON lines; exits 1 when any is an error (severity 0).
import { Parser } from '@asyncapi/parser';
import { readFileSync } from 'node:fs';

const text = readFileSync(process.argv[2] ?? 0, 'utf8');
const parser = new Parser();
const { document, diagnostics } = await parser.parse(text);
let errors = 0;
for (const d of diagnostics) {
  if (d.severity === 0) errors += 1;
  console.log(JSON.stringify({ severity: d.severity, code: d.code, path: d.path.join('/'), message: d.message }));
}
if (!document || errors > 0) {
  console.error(`${errors} error(s)`);
  process.exit(1);
}
console.log(JSON.stringify({ ok: true, channels: document.channels().length, operations: document.operations().length }));
