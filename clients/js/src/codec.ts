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
};
