// The inspector page: edit bindings (kept in the page's URL), follow one stream,
// watch its messages. Plain modules, no build step: everything is served by the
// package itself.

import { MessageView } from "./messages.js";
import { QUEUE_EXCHANGES, presetBindings } from "./presets.js";
import { Stream } from "./stream.js";

const $ = (id) => document.getElementById(id);
const base = new URL(".", location.href);  // the service, also behind a path prefix

let bindings = bindingsFromPage();
let stream = null;
let lastPing = null;
const view = new MessageView($("messages"), $("counts"));

// --- bindings --------------------------------------------------------------

function blank() {
  return { exchange: "", routingKeyPattern: "" };
}

function filledIn(binding) {
  return binding.exchange !== "" || binding.routingKeyPattern !== "";
}

function bindingsFromPage() {
  const text = new URLSearchParams(location.search).get("bindings");
  if (!text) return [blank()];
  try {
    const list = JSON.parse(text).bindings;
    if (Array.isArray(list)) {
      return list.map((b) => ({
        exchange: String(b?.exchange ?? ""),
        routingKeyPattern: String(b?.routingKeyPattern ?? ""),
      }));
    }
  } catch {
    // an unreadable link: start empty, and say so below
  }
  queueMicrotask(() => showCopied("The link's bindings could not be read."));
  return [blank()];
}

/** The bindings as the stream's `bindings` parameter; blank rows left out. */
function bindingsJson() {
  return JSON.stringify({ bindings: bindings.filter(filledIn) });
}

function keepInPageUrl() {
  const url = new URL(location.href);
  url.searchParams.set("bindings", bindingsJson());
  if (resuming()) url.searchParams.set("resume", "true");
  else url.searchParams.delete("resume");
  history.replaceState(null, "", url);
}

function resuming() {
  return $("resume").checked;
}

function renderBindings() {
  const body = $("bindings").tBodies[0];
  body.replaceChildren();
  bindings.forEach((binding, index) => {
    const row = body.insertRow();
    for (const [field, label] of [["exchange", "exchange"], ["routingKeyPattern", "routing-key pattern"]]) {
      const input = document.createElement("input");
      input.value = binding[field];
      input.spellcheck = false;
      input.setAttribute("aria-label", `${label} ${index + 1}`);
      input.className = field;
      if (field === "exchange") input.setAttribute("list", "queue-exchanges");
      input.addEventListener("input", () => {
        binding[field] = input.value;
        keepInPageUrl();
      });
      row.insertCell().append(input);
    }
    const remove = document.createElement("button");
    remove.type = "button";
    remove.textContent = "Remove";
    remove.className = "remove";
    remove.addEventListener("click", () => {
      bindings.splice(index, 1);
      renderBindings();
      keepInPageUrl();
    });
    row.insertCell().append(remove);
  });
}

function addBindings(added) {
  // A preset takes the place of the blank row a fresh page starts with.
  bindings = bindings.filter(filledIn);
  bindings.push(...added);
  renderBindings();
  keepInPageUrl();
}

function setUpPresets() {
  const select = $("preset-exchange");
  const every = new Option("every queue exchange", "*");
  select.append(...QUEUE_EXCHANGES.map((e) => new Option(e.name, e.name)), every);
  select.value = "task-completed";
  $("queue-exchanges").append(...QUEUE_EXCHANGES.map((e) => new Option(e.exchange)));
  $("preset").addEventListener("submit", (event) => {
    event.preventDefault();
    const id = $("preset-id").value.trim();
    try {
      addBindings(presetBindings(select.value, $("preset-kind").value, id));
      $("preset-message").textContent = "";
    } catch (error) {
      $("preset-message").textContent = error.message;
    }
  });
}

// --- the stream ------------------------------------------------------------

function streamUrl() {
  const url = new URL("api/events/v1/connect/", base);
  url.searchParams.set("bindings", bindingsJson());
  if (resuming()) url.searchParams.set("resume", "true");
  return url.href;
}

function showNotice(text) {
  $("notice").textContent = text;
  $("notice").hidden = !text;
}

function showState(name, detail = "") {
  const state = $("state");
  state.className = `state ${name}`;
  state.dataset.state = name;
  const label = name === "idle" ? "disconnected" : name;
  $("state-text").textContent = detail ? `${label}: ${detail}` : label;
  const open = name !== "idle" && name !== "error";
  $("disconnect").disabled = !open;
  $("connect").textContent = open ? "Reconnect" : "Connect";
  showPingAge();
}

function showPingAge() {
  const state = $("state").dataset.state;
  let text = "";
  if (state === "ready" || state === "reconnecting") {
    text = lastPing === null ? "no ping yet" : `last ping ${Math.round((Date.now() - lastPing) / 1000)} s ago`;
  }
  $("ping-age").textContent = text;
}

function connect() {
  stream?.close();
  lastPing = null;
  showNotice("");
  stream = new Stream(streamUrl(), {
    state: showState,
    message: (data) => view.add(data),
    ping: () => {
      lastPing = Date.now();
      showPingAge();
    },
    gap: (asked, earliest) => showNotice(
      `Messages after position ${asked} are no longer kept; resumed from ${earliest}. ` +
      "Some were missed: re-check what you were waiting for.",
    ),
  }, resuming());
  stream.open();
}

function disconnect() {
  stream?.close();
  stream = null;
  showState("idle");
}

// --- copying ---------------------------------------------------------------

function shellQuote(text) {
  return /^[A-Za-z0-9_@%+=:,./-]+$/.test(text) ? text : `'${text.replaceAll("'", "'\\''")}'`;
}

function listenCommand() {
  const words = ["tc-events", "listen", "--url", base.href.replace(/\/$/, "")];
  for (const b of JSON.parse(bindingsJson()).bindings) {
    words.push("-e", b.exchange, "-p", b.routingKeyPattern);
  }
  if (resuming()) words.push("--resume");
  return words.map(shellQuote).join(" ");
}

function showCopied(text) {
  const output = $("copied");
  output.textContent = text;
  output.hidden = false;
}

async function copy(what, text) {
  try {
    await navigator.clipboard.writeText(text);
    showCopied(`${what} copied:\n${text}`);
  } catch {
    // No clipboard here (a page served over plain HTTP from another host): show it.
    showCopied(`Copy the ${what}:\n${text}`);
    getSelection().selectAllChildren($("copied"));
  }
}

// --- wiring ----------------------------------------------------------------

setUpPresets();
$("resume").checked = new URLSearchParams(location.search).get("resume") === "true";
$("resume").addEventListener("change", keepInPageUrl);
renderBindings();
showState("idle");
$("add-binding").addEventListener("click", () => {
  bindings.push(blank());
  renderBindings();
  $("bindings").tBodies[0].lastElementChild.querySelector("input").focus();
});
$("connect").addEventListener("click", connect);
$("disconnect").addEventListener("click", disconnect);
$("copy-json").addEventListener("click", () => copy("bindings JSON", bindingsJson()));
$("copy-url").addEventListener("click", () => copy("stream URL", streamUrl()));
$("copy-command").addEventListener("click", () => copy("listen command", listenCommand()));

let filterTimer = null;
$("filter").addEventListener("input", () => {
  clearTimeout(filterTimer);
  filterTimer = setTimeout(() => view.setFilter($("filter").value), 100);
});
$("pause").addEventListener("click", () => {
  const paused = !view.paused;
  view.setPaused(paused);
  $("pause").textContent = paused ? "Resume" : "Pause";
  $("pause").setAttribute("aria-pressed", String(paused));
});
$("clear").addEventListener("click", () => view.clear());
setInterval(showPingAge, 1000);
document.body.dataset.loaded = "true";
