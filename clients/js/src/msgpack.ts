// shardcast-client/msgpack: the same client speaking MessagePack (`shardcast.v1.msgpack`), with
// @msgpack/msgpack as its one dependency (an optional peer of the package, so the JSON build has
// none).

import { decode, encode } from "@msgpack/msgpack";
import { Client, json, type ConnectOptions, type Codec, type Frame } from "./index.js";

export * from "./index.js";

export const msgpack: Codec = {
  protocol: "shardcast.v1.msgpack",
  encode: (frame) => encode(frame),
  decode: (data) => {
    const frame = decode(typeof data === "string" ? new TextEncoder().encode(data) : new Uint8Array(data)) as Frame;
    if (frame === null || typeof frame !== "object" || typeof frame.op !== "string") {
      throw new TypeError("not a frame");
    }
    return frame;
  },
  // The value's MessagePack bytes, carried as `bin`.
  bytesOf: (data) => {
    if (!(data instanceof Uint8Array)) throw new TypeError("the data of a delta-mode frame is not bin");
    return data;
  },
  valueOf: (bytes) => decode(bytes),
};

/** `connect` whose `encoding` may also be `'msgpack'` (its default here). */
export function connect(url: string, options: Omit<ConnectOptions, "encoding"> & { encoding?: "json" | "msgpack" | Codec } = {}): Client {
  const { encoding = "msgpack", ...rest } = options;
  return new Client(url, rest, encoding === "msgpack" ? msgpack : encoding === "json" ? json : encoding);
}
