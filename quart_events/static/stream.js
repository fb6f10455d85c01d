// One stream of the service, followed with the browser's EventSource, and what a
// person wants to know of it: connecting, ready, the server's error, reconnecting.
//
// The browser reconnects by itself after a network failure and after the server's
// `reconnect` frame (shutdown, too many streams). A stream that ended otherwise is
// answered 204 when the browser comes back with its Last-Event-ID, and the browser
// then gives up: this page opens a fresh stream itself, with a growing delay. After
// the server's `error` event (bad bindings, a missing exchange, too slow) the stream
// stays closed: the error is the answer.
//
// A resumable stream (`resume=true`) loses nothing across reconnects: the browser
// comes back with the last message's id as its Last-Event-ID, and a stream this page
// opens again asks `since=` that position. Its errors that ask it back (too slow)
// carry no `id: -`: the browser resumes; the final ones (bad bindings) end it.

const MAX_DELAY_S = 30;

export class Stream {
  /**
   * @param {string} url the stream's URL, bindings included
   * @param {{state: (name: string, detail?: string) => void,
   *          message: (data: string) => void,
   *          ping: (time: string) => void,
   *          gap: (asked: number, earliest: number) => void}} on
   * @param {boolean} resume whether the URL asks `resume=true`
   */
  constructor(url, on, resume = false) {
    this.url = url;
    this.on = on;
    this.resume = resume;
    this.position = null;  // the last message's, on a resumable stream
    this.source = null;
    this.reopenTimer = null;
    this.failures = 0;
  }

  /** Where a new EventSource goes: a resumable one from its last position. */
  openingUrl() {
    if (this.position === null) return this.url;
    const url = new URL(this.url);
    url.searchParams.set("since", this.position);
    return url.href;
  }

  open() {
    this.stopSource();
    const source = new EventSource(this.openingUrl());
    this.source = source;
    const current = (handler) => (event) => {
      if (this.source === source) handler(event);
    };
    this.on.state("connecting");
    let asked = false;  // the server's reconnect frame says more than the error after it
    source.addEventListener("open", current(() => {
      asked = false;
      this.on.state("connecting", "waiting for the broker");
    }));
    source.addEventListener("ready", current(() => {
      this.failures = 0;
      this.on.state("ready");
    }));
    source.addEventListener("message", current((event) => {
      if (this.resume && event.lastEventId) this.position = event.lastEventId;
      this.on.message(event.data);
    }));
    source.addEventListener("gap", current((event) => {
      const gap = parseData(event.data);
      this.on.gap(gap.from, gap.earliest);
    }));
    source.addEventListener("ping", current((event) => this.on.ping(parseData(event.data).time)));
    source.addEventListener("reconnect", current(() => {
      asked = true;
      this.on.state("reconnecting", "the server asked to come back later");
    }));
    source.addEventListener("error", current((event) => {
      if (event.data !== undefined && this.resume && event.lastEventId !== "-") {
        asked = true;  // it asks the stream back: the browser resumes from its last id
        this.on.state("reconnecting", String(parseData(event.data)));
      } else if (event.data !== undefined) {
        this.close();  // the server's own error event: the answer, not a failure
        this.on.state("error", String(parseData(event.data)));
      } else if (source.readyState === EventSource.CONNECTING) {
        if (!asked) this.on.state("reconnecting", "the connection was lost");
      } else {
        this.reopenLater();
      }
    }));
  }

  reopenLater() {
    this.stopSource();
    const delay = Math.min(MAX_DELAY_S, 2 ** this.failures) * (0.5 + Math.random() / 2);
    this.failures += 1;
    this.on.state("reconnecting", `next try in ${Math.ceil(delay)} s`);
    this.reopenTimer = setTimeout(() => this.open(), delay * 1000);
  }

  stopSource() {
    clearTimeout(this.reopenTimer);
    this.reopenTimer = null;
    if (this.source) this.source.close();
    this.source = null;
  }

  close() {
    this.stopSource();
    this.failures = 0;
  }
}

function parseData(data) {
  try {
    return JSON.parse(data);
  } catch {
    return data;
  }
}
