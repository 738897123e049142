// What the unmodified JS client (npm `chromadb`) raises for stcs's quota and rate-limit answers.
// Usage: node quota_errors.mjs PORT TOKEN NODE_MODULES   (NODE_MODULES: a directory holding the
// installed `chromadb` package).  Prints one JSON line: {"quota": NAME, "rate": NAME, ...}.
import { join } from "node:path";
import { pathToFileURL } from "node:url";

const [port, token, modules] = process.argv.slice(2);
const { ChromaClient } = await import(
  pathToFileURL(join(modules, "chromadb", "dist", "chromadb.mjs")).href
);
const client = new ChromaClient({
  host: "127.0.0.1",
  port: Number(port),
  headers: { "X-Chroma-Token": token },
});
const result = {};
try {
  await client.createCollection({ name: "second", embeddingFunction: null });
  result.quota = "no error";
} catch (err) {
  result.quota = err.name;
  result.quotaMessage = err.message;
}
try {
  for (let i = 0; i < 50; i++) await client.heartbeat();
  result.rate = "no error";
} catch (err) {
  result.rate = err.name;
}
console.log(JSON.stringify(result));
