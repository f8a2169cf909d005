// Preloaded (`node --require`) into server-everything's Streamable HTTP mode by the tests.
// That server calls `app.listen(process.env.PORT)` with no host, i.e. on every interface.
// This forces every plain `listen(port[, cb])` onto 127.0.0.1 and, once bound, prints the
// port the OS chose (PORT=0) as `LOOPBACK_LISTEN <port>` on stderr for the test fixture.
"use strict";
const net = require("net");
const original = net.Server.prototype.listen;
net.Server.prototype.listen = function (...args) {
  const first = args[0];
  const isPort =
    typeof first === "number" ||
    (typeof first === "string" && first.trim() !== "" && Number(first) >= 0);
  if (isPort && (args.length === 1 || typeof args[1] === "function")) {
    args.splice(1, 0, "127.0.0.1");
  } else if (first && typeof first === "object" && !first.path) {
    args[0] = { ...first, host: "127.0.0.1" };
  }
  this.once("listening", () => {
    const a = this.address();
    if (a && typeof a === "object") {
      process.stderr.write(`LOOPBACK_LISTEN ${a.address} ${a.port}\n`);
    }
  });
  return original.apply(this, args);
};
