// The unmodified WebListener of npm taskcluster-client-web 9.0.0, with npm `ws` as its
// WebSocket, driven by test_legacy_websocket.py: one JSON line per thing it heard.
//   node weblistener_client.cjs ROOT_URL FIRST_BINDING_JSON
// Then each line on stdin is a binding (JSON) to bind on the live socket.
const path = require("path");
const modules = process.env.NODE_MODULES;
global.WebSocket = require(path.join(modules, "ws"));
const { WebListener } = require(path.join(modules, "taskcluster-client-web"));
const readline = require("readline");

const say = (kind, payload) => process.stdout.write(JSON.stringify({ kind, payload }) + "\n");
// WebListener's reconnect timer leaves the rejection of a failed attempt unhandled; a
// browser only logs that, while Node would exit: here too it is only said.
process.on("unhandledRejection", () => say("unhandled-rejection", null));

async function main() {
  const [rootUrl, first] = process.argv.slice(2);
  const listener = new WebListener({ rootUrl, reconnectInterval: 1000 });
  listener.on("message", (message) => say("message", message));
  listener.on("error", (error) => say("error", error && (error.message || error)));
  listener.on("close", () => say("close", null));
  listener.on("reconnect", () => say("reconnect", null));
  listener.on("ready", () => say("ready", null));
  await listener.bind(JSON.parse(first)); // before connect: sent once the socket is open
  await listener.connect();
  say("connected", null);
  const lines = readline.createInterface({ input: process.stdin });
  for await (const line of lines) {
    try {
      say("bound", await listener.bind(JSON.parse(line)));
    } catch (error) {
      say("bind-error", error);
    }
  }
}

main().catch((error) => {
  say("failed", String(error && (error.message || error)));
  process.exit(1);
});
