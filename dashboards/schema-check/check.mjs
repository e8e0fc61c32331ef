// Type-checks Grafana dashboard JSON files against Grafana's own schema: the `Dashboard` type of
// `@grafana/schema` (Grafana's published TypeScript types for dashboard JSON). Each file becomes
// an object literal of that type, so a wrong type, a missing required field or a property the
// schema does not know is a compile error.
//
//   node check.mjs <dashboard.json>...
//
// Prints every error with its file, exits 1 if any.

import { readFileSync, writeFileSync, mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { basename, dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";
import ts from "typescript";

const here = dirname(fileURLToPath(import.meta.url));
const files = process.argv.slice(2);
if (files.length === 0) {
  console.error("usage: node check.mjs <dashboard.json>...");
  process.exit(2);
}

const work = mkdtempSync(join(tmpdir(), "meterd-dashboards-"));
const sources = [];
for (const file of files) {
  const json = JSON.parse(readFileSync(file, "utf8"));
  const source = join(work, basename(file, ".json") + ".ts");
  writeFileSync(
    source,
    `import type { Dashboard } from "@grafana/schema";\n` +
      `export const dashboard: Dashboard = ${JSON.stringify(json, null, 2)};\n`,
  );
  sources.push([source, file]);
}

const program = ts.createProgram(
  sources.map(([s]) => s),
  {
    strict: true,
    noEmit: true,
    module: ts.ModuleKind.NodeNext,
    moduleResolution: ts.ModuleResolutionKind.NodeNext,
    target: ts.ScriptTarget.ES2022,
    skipLibCheck: true,
    typeRoots: [],
    types: [],
    baseUrl: here,
    paths: { "@grafana/schema": [resolve(here, "node_modules/@grafana/schema")] },
  },
);
const diagnostics = ts.getPreEmitDiagnostics(program);
const original = new Map(sources);
for (const d of diagnostics) {
  const message = ts.flattenDiagnosticMessageText(d.messageText, "\n");
  if (d.file && d.start !== undefined) {
    const { line, character } = d.file.getLineAndCharacterOfPosition(d.start);
    const name = original.get(d.file.fileName) ?? d.file.fileName;
    console.error(`${name} (as TypeScript, line ${line + 1}:${character + 1}): ${message}`);
  } else {
    console.error(message);
  }
}
rmSync(work, { recursive: true, force: true });
if (diagnostics.length > 0) {
  process.exit(1);
}
console.log(`${files.length} dashboards match @grafana/schema's Dashboard type`);
