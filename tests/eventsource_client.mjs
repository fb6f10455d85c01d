// Follows one stream (or COUNT streams of the same URL) with the npm `eventsource`
// package (2.x or 3.x, by module name) and prints every event as one JSON line, with
// the index of its source: what the test checks.
import { createRequire } from "node:module";

const [moduleName, url] = process.argv.slice(2);
const require = createRequire(process.env.NODE_MODULES + "/");
const loaded = require(moduleName);
const EventSource = loaded.EventSource ?? loaded;
const sources = [];

for (let index = 0; index < Number(process.env.COUNT ?? 1); index++) {
  const report = (kind, extra = {}) => console.log(JSON.stringify({ kind, source: index, ...extra }));
  const source = new EventSource(url);
  sources.push(source);
  source.onopen = () => report("open");
  source.onerror = (event) => report("error", { readyState: source.readyState, status: event?.status ?? null });
  source.onmessage = (event) => report("onmessage", { data: event.data });
  for (const name of ["ready", "message"]) {
    source.addEventListener(name, (event) => report(name, { data: event.data, lastEventId: event.lastEventId }));
  }
}
setTimeout(() => {
  for (const source of sources) source.close();
  process.exit(0);
}, Number(process.env.FOLLOW_MS ?? 30000));
