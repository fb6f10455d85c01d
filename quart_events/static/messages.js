// The live table of messages. It stays responsive at thousands of messages a
// second: messages are only queued as they arrive and rendered in batches a few
// times a second, the table keeps at most `cap` rows (newest first, besides rows
// expanded to read) and counts what it dropped from view, and pausing holds messages back (up to `cap` as well)
// without losing the ones that arrive meanwhile.

const BATCH_MS = 100;

export class MessageView {
  /**
   * @param {HTMLTableElement} table its <thead> stays; every message is a <tbody>
   * @param {HTMLElement} counts where the counts are shown
   */
  constructor(table, counts, cap = 500) {
    this.table = table;
    this.countsElement = counts;
    this.cap = cap;
    this.incoming = [];  // [arrival time, raw data], oldest first
    this.timer = null;
    this.paused = false;
    this.filter = "";
    this.received = 0;
    this.dropped = 0;
    this.showCounts();
    table.addEventListener("click", (event) => this.toggleFrom(event.target));
    table.addEventListener("keydown", (event) => {
      if (event.key === "Enter" || event.key === " ") {
        event.preventDefault();
        this.toggleFrom(event.target);
      }
    });
  }

  add(raw) {
    this.received += 1;
    this.incoming.push([new Date(), raw]);
    if (this.incoming.length >= 2 * this.cap) {  // trimmed in steps, not per message
      const excess = this.incoming.length - this.cap;
      this.incoming.splice(0, excess);
      this.dropped += excess;
    }
    if (this.timer === null) this.timer = setTimeout(() => this.flush(), BATCH_MS);
  }

  flush() {
    this.timer = null;
    if (this.paused) {
      this.showCounts();
      return;
    }
    const batch = this.incoming;
    this.incoming = [];
    const first = Math.max(0, batch.length - this.cap);
    this.dropped += first;
    const fragment = document.createDocumentFragment();
    for (let i = batch.length - 1; i >= first; i--) {
      fragment.append(this.render(...batch[i]));
    }
    this.table.tHead.after(fragment);
    // The oldest rows go, except the ones someone expanded to read.
    const bodies = this.table.tBodies;
    for (let i = bodies.length - 1; i >= 0 && bodies.length > this.cap; i--) {
      if (bodies[i].rows.length === 1) {
        bodies[i].remove();
        this.dropped += 1;
      }
    }
    this.showCounts();
  }

  render(time, raw) {
    const message = parse(raw);
    const body = document.createElement("tbody");
    body.className = "message";
    body.searchText = raw.toLowerCase();
    body.message = message;
    const row = body.insertRow();
    row.tabIndex = 0;
    row.setAttribute("aria-expanded", "false");
    const routes = Array.isArray(message.routes) ? message.routes.join(", ") : "";
    for (const text of [time.toISOString().slice(11, 23), message.exchange, message.routingKey, routes]) {
      row.insertCell().textContent = text ?? "";
    }
    body.hidden = !this.matches(body);
    return body;
  }

  toggleFrom(target) {
    const row = target.closest("tr");
    const body = row?.parentElement;
    if (!body || body.className !== "message" || row !== body.rows[0]) return;
    const expanded = body.rows.length > 1;
    if (expanded) {
      body.rows[1].remove();
    } else {
      const cell = body.insertRow().insertCell();
      cell.colSpan = 4;
      cell.className = "payload";
      const pre = document.createElement("pre");
      const payload = body.message.payload;
      pre.textContent = typeof payload === "string" ? payload : JSON.stringify(payload, null, 2);
      cell.append(pre);
    }
    row.setAttribute("aria-expanded", String(!expanded));
  }

  setFilter(text) {
    this.filter = text.trim().toLowerCase();
    for (const body of this.table.tBodies) body.hidden = !this.matches(body);
    this.showCounts();
  }

  matches(body) {
    return this.filter === "" || body.searchText.includes(this.filter);
  }

  setPaused(paused) {
    this.paused = paused;
    if (!paused) this.flush();
    else this.showCounts();
  }

  clear() {
    for (const body of [...this.table.tBodies]) body.remove();
    this.incoming = [];
    this.received = this.dropped = 0;
    this.showCounts();
  }

  showCounts() {
    const bodies = this.table.tBodies;
    const parts = [`${this.received} received`, `${bodies.length} in view`];
    if (this.filter) {
      const matching = Array.prototype.filter.call(bodies, (body) => !body.hidden).length;
      parts.push(`${matching} matching`);
    }
    parts.push(`${this.dropped} dropped from view`);
    if (this.paused) parts.push(`${this.incoming.length} waiting`);
    this.countsElement.textContent = parts.join(" · ");
  }
}

function parse(raw) {
  try {
    const message = JSON.parse(raw);
    if (message && typeof message === "object") return message;
  } catch {
    // shown as it came, below
  }
  return { payload: raw, exchange: "", routingKey: "", routes: [] };
}
