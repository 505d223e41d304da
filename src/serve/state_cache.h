// The server's state cache: the recurrent states of conversations seen before, keyed by their
// token sequences, so a request that repeats a conversation so far only feeds the new tokens.
// An RWKV state has a fixed size whatever the length of the text behind it, so a cached entry
// costs the same for turn 1 as for turn 10 (plus 4 bytes a token for its key). Keys are tokens
// alone, so a cache serves one model (and one initial state): the server keeps one per model.
#pragma once

#include <cstddef>
#include <cstdint>
#include <list>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <span>
#include <unordered_map>
#include <vector>

#include "aviary/state.h"

namespace aviary::serve {

class StateCache {
 public:
  // The longest cached prefix of a prompt.
  struct Hit {
    size_t length = 0;          // tokens of the prompt the state has consumed (1..prompt size)
    State state;                // the state after those tokens: a copy the caller may advance
    std::vector<float> logits;  // the logits row after the last of them
  };
  struct Stats {
    uint64_t hits = 0;
    uint64_t misses = 0;
    uint64_t evictions = 0;  // entries dropped to stay within the budget
    size_t entries = 0;
    size_t bytes = 0;  // what the entries are counted at (EntryBytes), never above max_bytes
    size_t max_bytes = 0;
  };

  // Holds at most `max_bytes` of entries; 0 disables the cache (Insert stores nothing).
  explicit StateCache(size_t max_bytes);
  StateCache(const StateCache&) = delete;
  StateCache& operator=(const StateCache&) = delete;

  // Saves `state` (after feeding `tokens` from the model's start state) with the logits row of
  // the last token; replaces an entry with the same tokens. Evicts the least recently used
  // entries until it fits; an entry larger than the whole budget, or an empty sequence, is not
  // stored. Returns whether it was stored.
  bool Insert(std::span<const int32_t> tokens, const State& state,
              std::span<const float> last_logits);

  // The entry for the longest prefix of `tokens` (the whole of it included), which becomes the
  // most recently used; nullopt when no prefix is cached. Costs O(tokens.size()) whatever the
  // number of entries.
  // `count`: whether the lookup counts in the hits and misses (false for a server's own
  // bookkeeping, so the statistics describe requests).
  std::optional<Hit> Lookup(std::span<const int32_t> tokens, bool count = true);

  Stats stats() const;

  // What an entry is counted at: the state's floats, the logits, the key's tokens and the
  // bookkeeping of the entry, its list node and its index node.
  static size_t EntryBytes(size_t tokens, size_t state_bytes, size_t logits);

 private:
  struct Entry {
    std::vector<int32_t> tokens;
    uint64_t hash = 0;
    State state;
    std::vector<float> logits;
    size_t bytes = 0;
  };
  // Shared so that Lookup copies a state after releasing the lock, and an eviction meanwhile
  // does not free what is being copied.
  using EntryPtr = std::shared_ptr<const Entry>;
  using LruList = std::list<EntryPtr>;  // most recently used first

  void EvictLocked(LruList::iterator it);

  const size_t max_bytes_;
  mutable std::mutex mutex_;
  LruList lru_;
  // Hash of a whole key (PrefixHash) -> its entry. A lookup hashes each prefix of the prompt
  // once, incrementally, and compares tokens only on a hash match.
  std::unordered_map<uint64_t, LruList::iterator> index_;
  // Key length -> entries of that length: a lookup probes the index only at lengths some entry
  // has, rather than at every prefix of the prompt.
  std::map<size_t, size_t> length_counts_;
  Stats stats_;
};

}  // namespace aviary::serve
