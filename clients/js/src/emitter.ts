// A typed event emitter small enough for the browser bundle (no dependency on Node's `events`).

type Listener = (arg: any) => void;

export class Emitter<Events extends object> {
  #listeners = new Map<keyof Events, Set<Listener>>();

  /** Calls `fn` on every `event` until `off`; returns a function that removes it. */
  on<K extends keyof Events>(event: K, fn: (arg: Events[K]) => void): () => void {
    let set = this.#listeners.get(event);
    if (!set) this.#listeners.set(event, (set = new Set()));
    set.add(fn);
    return () => this.off(event, fn);
  }

  off<K extends keyof Events>(event: K, fn: (arg: Events[K]) => void): void {
    this.#listeners.get(event)?.delete(fn);
  }

  /** A listener that throws does not keep the others, or the client, from running. */
  protected emit<K extends keyof Events>(event: K, arg: Events[K]): void {
    for (const fn of [...(this.#listeners.get(event) ?? [])]) {
      try {
        fn(arg);
      } catch (e) {
        setTimeout(() => {
          throw e;
        });
      }
    }
  }
}
