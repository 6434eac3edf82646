// Builds the demo page into one HTML file with its script inline (dist/demo.html, which the node
// embeds): `node scripts/bundle-demo.mjs`. `build()` is also what the test compares the committed
// file with.

import * as esbuild from "esbuild";
import { readFileSync, writeFileSync, mkdirSync } from "node:fs";
import { fileURLToPath } from "node:url";

const root = fileURLToPath(new URL("..", import.meta.url));
export const OUT = `${root}dist/demo.html`;

export async function build() {
  const result = await esbuild.build({
    entryPoints: [`${root}demo/main.ts`],
    bundle: true,
    minify: true,
    format: "iife",
    target: "es2022",
    legalComments: "none",
    write: false,
  });
  const js = result.outputFiles[0].text;
  if (js.includes("</script")) throw new Error("the bundle holds </script and cannot be inlined");
  const page = readFileSync(`${root}demo/page.html`, "utf8");
  return page.replace("<!-- script -->", () => `<script>${js.trim()}</script>`);
}

if (process.argv[1] === fileURLToPath(import.meta.url)) {
  mkdirSync(`${root}dist`, { recursive: true });
  writeFileSync(OUT, await build());
  console.log(`wrote ${OUT}`);
}
