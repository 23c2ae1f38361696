// bzpush.js: a dependency-free client for bzpush (and bugzfeed) servers.
//
//   const feed = new BzpushClient("wss://bugzilla.example.org/bzpush/");
//   feed.addEventListener("update", (e) => console.log(e.detail.bug, e.detail.when));
//   feed.addEventListener("partial", (e) => refreshFromRest(e.detail.bugs));
//   feed.subscribe([1234, 5678]);
//
// It reconnects by itself, waiting longer after each failure (with jitter,
// so a thousand clients cut off by one restart do not all come back in the
// same second), and resubscribes with `since` set to the newest `when` it
// has seen, so nothing that changed while it was away is lost. Before it
// has seen any update it has no time of the server's to ask from (its own
// clock may be hours off the database's): it resubscribes without `since`
// and emits `partial` for the bugs it was subscribed to, which may have
// changed meanwhile.
//
// Events (a CustomEvent each, data in `detail`):
//   update   {bug, when}       a bug changed; may repeat, never skips
//   partial  {bugs}            the server cannot vouch for every update since
//                              the last one seen, or none was seen before a
//                              reconnect: refresh these bugs from Bugzilla's
//                              REST API
//   open     {}                connected and (re)subscribed
//   close    {code, reason, retryIn}   disconnected; retrying in retryIn ms
//   error    {command, error}  the server refused a command
// Loaded as a classic script it defines `BzpushClient` globally.
"use strict";

(function (global) {
  // `YYYY-MM-DDTHH:MM:SS` from any of the forms the server accepts, so
  // times compare as text in time order.
  function normalize(when) {
    return String(when).replace(" ", "T").replace(/Z$/, "").slice(0, 19);
  }

  class BzpushClient extends EventTarget {
    // `url`: the feed's WebSocket address. Options: `minDelay`, `maxDelay`
    // (ms) bound the wait between reconnects.
    constructor(url, options = {}) {
      super();
      this.url = url;
      this.minDelay = options.minDelay || 1000;
      this.maxDelay = options.maxDelay || 60000;
      this.bugs = new Set();
      this.newest = null; // newest `when` seen, normalized
      this.sent = new Set(); // bugs subscribed on some connection
      this.missed = []; // bugs to report `partial` for at the next subscribe answer
      this.lastByBug = new Map(); // bug -> last `when` delivered
      this.failures = 0;
      this.timer = null;
      this.closed = false;
      this.ws = null;
      this.connect();
    }

    // Adds bugs (numbers or decimal strings) to the subscriptions.
    subscribe(bugs) {
      const added = [].concat(bugs).map(Number).filter((b) => Number.isInteger(b) && b > 0 && !this.bugs.has(b));
      if (added.length === 0) return;
      added.forEach((b) => this.bugs.add(b));
      if (this.send(this.subscribeCommand(added))) added.forEach((b) => this.sent.add(b));
    }

    unsubscribe(bugs) {
      const removed = [].concat(bugs).map(Number).filter((b) => this.bugs.delete(b));
      removed.forEach((b) => {
        this.lastByBug.delete(b);
        this.sent.delete(b);
      });
      if (removed.length) this.send({command: "unsubscribe", bugs: removed});
    }

    // Stops for good: no reconnect.
    close() {
      this.closed = true;
      clearTimeout(this.timer);
      if (this.ws) this.ws.close(1000, "client closed");
    }

    // `since` only from a `when` the server sent: a time from this
    // client's clock could be ahead of the database's, and the server
    // would vouch for it and skip what changed in between.
    subscribeCommand(bugs) {
      const command = {command: "subscribe", bugs};
      if (this.newest) command.since = this.newest;
      return command;
    }

    // Whether `message` went out (the connection is open).
    send(message) {
      if (!this.ws || this.ws.readyState !== WebSocket.OPEN) return false;
      this.ws.send(JSON.stringify(message));
      return true;
    }

    emit(type, detail) {
      this.dispatchEvent(new CustomEvent(type, {detail}));
    }

    connect() {
      let ws;
      try {
        ws = new WebSocket(this.url);
      } catch (e) {
        this.retry(1006, String(e));
        return;
      }
      this.ws = ws;
      ws.onopen = () => {
        const bugs = [...this.bugs];
        // No `when` seen: nothing tells what changed while away.
        this.missed = this.newest ? [] : bugs.filter((b) => this.sent.has(b));
        if (bugs.length) {
          this.send(this.subscribeCommand(bugs));
          bugs.forEach((b) => this.sent.add(b));
        }
        this.emit("open", {});
      };
      ws.onmessage = (event) => this.receive(event.data);
      ws.onclose = (event) => {
        if (this.ws === ws) this.retry(event.code, event.reason);
      };
    }

    receive(data) {
      let msg;
      try {
        msg = JSON.parse(data);
      } catch (_) {
        return;
      }
      if (msg.command === "update") {
        const when = normalize(msg.when);
        // The same pair again (a catch-up overlapping what was live): once
        // is enough. An earlier `when` is a real change and goes through.
        if (this.lastByBug.get(msg.bug) === when) return;
        this.lastByBug.set(msg.bug, when);
        if (!this.newest || when > this.newest) this.newest = when;
        this.emit("update", {bug: msg.bug, when: msg.when});
      } else if (msg.result === "error") {
        this.emit("error", {command: msg.command, error: msg.error});
      } else if (msg.command === "subscribe") {
        // A working subscription: the next failure starts the backoff afresh.
        this.failures = 0;
        if (msg.partial) this.emit("partial", {bugs: msg.bugs});
        else if (this.missed.length) this.emit("partial", {bugs: this.missed});
        this.missed = [];
      }
    }

    retry(code, reason) {
      this.ws = null;
      if (this.closed) {
        this.emit("close", {code, reason, retryIn: null});
        return;
      }
      const ceiling = Math.min(this.maxDelay, this.minDelay * 2 ** this.failures);
      // Full jitter over the upper half: spread, yet never hammering.
      const delay = Math.round(ceiling / 2 + Math.random() * ceiling / 2);
      this.failures = Math.min(this.failures + 1, 30);
      this.emit("close", {code, reason, retryIn: delay});
      this.timer = setTimeout(() => this.connect(), delay);
    }
  }

  global.BzpushClient = BzpushClient;
})(typeof globalThis !== "undefined" ? globalThis : this);
