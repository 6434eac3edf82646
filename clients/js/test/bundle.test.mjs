// The committed demo page (dist/demo.html, which the node embeds) must be what its source builds
// to, and the client must stay small in the browser.

import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import { test } from "node:test";
import { gzipSync } from "node:zlib";
import * as esbuild from "esbuild";
import { fileURLToPath } from "node:url";
import { build, OUT } from "../scripts/bundle-demo.mjs";

test("the committed demo bundle is a fresh build of its source (else: npm run build)", async () => {
  const committed = readFileSync(OUT, "utf8");
  assert.ok(committed === (await build()), `${OUT} is stale: run npm run build in clients/js and commit it`);
});

test("the JSON client is under 10 KB minified and gzipped, with fossil-delta its one dependency", async () => {
  const result = await esbuild.build({
    absWorkingDir: fileURLToPath(new URL("..", import.meta.url)),
    entryPoints: ["src/index.ts"],
    bundle: true,
    minify: true,
    format: "esm",
    write: false,
    metafile: true,
  });
  const inputs = Object.keys(result.metafile.inputs);
  assert.ok(
    inputs.every((f) => f.startsWith("src/") || f.startsWith("node_modules/fossil-delta/")),
    `only the SDK's own source and fossil-delta: ${inputs}`,
  );
  const bytes = result.outputFiles[0].contents;
  const gz = gzipSync(bytes, { level: 9 }).length;
  console.log(`shardcast-client: ${bytes.length} B minified, ${gz} B minified + gzip`);
  assert.ok(gz < 10 * 1024, `${gz} B`);
});
