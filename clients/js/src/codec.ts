// Wire encodings: how a frame becomes a WebSocket message and back. JSON is built in; MessagePack
// lives in `shardcast-client/msgpack` so the JSON build has no runtime dependency.

/** A frame of the client contract (docs/protocol.md): a map with an `op`. */
export type Frame = { op: string; [field: string]: unknown };

export interface Codec {
  /** The `Sec-WebSocket-Protocol` that asks the node for this encoding. */
  readonly protocol: string;
  encode(frame: Frame): string | Uint8Array;
  /** Throws on bytes that are not a frame. */
  decode(data: string | ArrayBuffer | Uint8Array): Frame;
  /**
   * In a room joined with `delta`: the bytes a keyed frame's `data` carries (a whole value's
   * encoding, or a fossil delta between two of them). Throws when `data` is not such bytes.
   */
  bytesOf(data: unknown): Uint8Array;
  /** The value a whole value's bytes encode. Throws on bytes that are not one. */
  valueOf(bytes: Uint8Array): unknown;
}

export const json: Codec = {
  protocol: "shardcast.v1.json",
  encode: (frame) => JSON.stringify(frame),
  decode: (data) => {
    const text = typeof data === "string" ? data : new TextDecoder().decode(data);
    const frame = JSON.parse(text);
    if (frame === null || typeof frame !== "object" || typeof frame.op !== "string") {
      throw new TypeError("not a frame: " + text.slice(0, 80));
    }
    return frame;
  },
  // The value's JSON text, carried as a string.
  bytesOf: (data) => {
    if (typeof data !== "string") throw new TypeError("the data of a delta-mode frame is not a string");
    return new TextEncoder().encode(data);
  },
  valueOf: (bytes) => JSON.parse(new TextDecoder().decode(bytes)),
};
