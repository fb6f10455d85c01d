// Follows one stream with the npm `eventsource` package (2.x or 3.x, by module name)
// and prints every event as one JSON line: what the test checks.
import { createRequire } from "node:module";

const [moduleName, url] = process.argv.slice(2);
const require = createRequire(process.env.NODE_MODULES + "/");
const loaded = require(moduleName);
const EventSource = loaded.EventSource ?? loaded;
const report = (kind, extra = {}) => console.log(JSON.stringify({ kind, ...extra }));

const source = new EventSource(url);
source.onopen = () => report("open");
source.onerror = (event) => report("error", { readyState: source.readyState, status: event?.status ?? null });
source.onmessage = (event) => report("onmessage", { data: event.data });
for (const name of ["ready", "message"]) {
  source.addEventListener(name, (event) => report(name, { data: event.data, lastEventId: event.lastEventId }));
}
setTimeout(() => { source.close(); process.exit(0); }, Number(process.env.FOLLOW_MS ?? 30000));
