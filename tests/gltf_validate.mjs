// Validates a .glb/.gltf with the Khronos glTF validator; prints the JSON report, exits 1 on errors.
// Usage: node tests/gltf_validate.mjs model.glb
// The validator is looked up in <repo>/.cache/node/node_modules first (where CI installs it),
// then through the usual Node resolution (NODE_PATH included).
import { readFileSync } from "node:fs";
import { createRequire } from "node:module";
import { basename, dirname, join } from "node:path";
import { fileURLToPath } from "node:url";

const require = createRequire(import.meta.url);
const repoCache = join(dirname(fileURLToPath(import.meta.url)), "..", ".cache", "node");

function loadValidator() {
  try {
    return require(require.resolve("gltf-validator", { paths: [repoCache] }));
  } catch {
    return require("gltf-validator");
  }
}

const path = process.argv[2];
if (!path) {
  console.error("usage: node tests/gltf_validate.mjs <model.glb>");
  process.exit(2);
}
const validator = loadValidator();
const report = await validator.validateBytes(new Uint8Array(readFileSync(path)), { uri: basename(path) });
console.log(JSON.stringify(report, null, 2));
process.exit(report.issues.numErrors > 0 ? 1 : 0);
