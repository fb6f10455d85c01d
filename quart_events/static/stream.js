// One stream of the service, followed with the browser's EventSource, and what a
// person wants to know of it: connecting, ready, the server's error, reconnecting.
//
// The browser reconnects by itself after a network failure and after the server's
// `reconnect` frame (shutdown, too many streams). A stream that ended otherwise is
// answered 204 when the browser comes back with its Last-Event-ID, and the browser
// then gives up: this page opens a fresh stream itself, with a growing delay. After
// the server's `error` event (bad bindings, a missing exchange, too slow) the stream
// stays closed: the error is the answer.

const MAX_DELAY_S = 30;

export class Stream {
  /**
   * @param {string} url the stream's URL, bindings included
   * @param {{state: (name: string, detail?: string) => void,
   *          message: (data: string) => void,
   *          ping: (time: string) => void}} on
   */
  constructor(url, on) {
    this.url = url;
    this.on = on;
    this.source = null;
    this.reopenTimer = null;
    this.failures = 0;
  }

  open() {
    this.stopSource();
    const source = new EventSource(this.url);
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
    source.addEventListener("message", current((event) => this.on.message(event.data)));
    source.addEventListener("ping", current((event) => this.on.ping(parseData(event.data).time)));
    source.addEventListener("reconnect", current(() => {
      asked = true;
      this.on.state("reconnecting", "the server asked to come back later");
    }));
    source.addEventListener("error", current((event) => {
      if (event.data !== undefined) {
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
