#include "serve/state_cache.h"

#include <algorithm>
#include <utility>

namespace aviary::serve {
namespace {

// One step of the prefix hash: the hash of tokens[0..i] from that of tokens[0..i-1], so all the
// prefixes of a prompt are hashed in one pass. SplitMix64's finaliser mixes every input bit into
// every output bit, so prefixes that differ anywhere land far apart; a collision costs only a
// token comparison (and, on Insert, the older entry).
uint64_t NextHash(uint64_t hash, int32_t token) {
  uint64_t z = hash + 0x9e3779b97f4a7c15ull + static_cast<uint32_t>(token);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

uint64_t SequenceHash(std::span<const int32_t> tokens) {
  uint64_t hash = 0;
  for (const int32_t t : tokens) hash = NextHash(hash, t);
  return hash;
}

}  // namespace

StateCache::StateCache(size_t max_bytes) : max_bytes_(max_bytes) { stats_.max_bytes = max_bytes; }

size_t StateCache::EntryBytes(size_t tokens, size_t state_bytes, size_t logits) {
  // Node sizes as libstdc++ allocates them: a list node holds two links and the shared_ptr; an
  // unordered_map node holds its link, the pair and the cached hash, plus a bucket pointer; a
  // std::map node (colour, three links, the pair) per key length, at most one per entry; the
  // shared_ptr's control block lives with the Entry (make_shared).
  constexpr size_t kListNode = 2 * sizeof(void*) + sizeof(EntryPtr);
  constexpr size_t kIndexNode = sizeof(void*) +
                                sizeof(std::pair<const uint64_t, LruList::iterator>) +
                                sizeof(size_t) + sizeof(void*);
  constexpr size_t kLengthNode = sizeof(int) + 3 * sizeof(void*) + 2 * sizeof(size_t);
  constexpr size_t kControlBlock = 2 * sizeof(void*) + 2 * sizeof(int);
  return sizeof(Entry) + kControlBlock + kListNode + kIndexNode + kLengthNode +
         tokens * sizeof(int32_t) + state_bytes + logits * sizeof(float);
}

bool StateCache::Insert(std::span<const int32_t> tokens, const State& state,
                        std::span<const float> last_logits) {
  if (tokens.empty()) return false;
  const size_t bytes = EntryBytes(tokens.size(), state.size_bytes(), last_logits.size());
  if (bytes > max_bytes_) return false;  // also the disabled cache (max_bytes 0)

  // The copies are made before taking the lock: they are the slow part and need no shared data.
  auto entry = std::make_shared<Entry>();
  entry->tokens.assign(tokens.begin(), tokens.end());
  entry->hash = SequenceHash(tokens);
  entry->state = state;
  entry->logits.assign(last_logits.begin(), last_logits.end());
  entry->bytes = bytes;

  std::lock_guard<std::mutex> lock(mutex_);
  // The same key (or, far more rarely, another with the same hash) gives way to the new entry.
  if (auto found = index_.find(entry->hash); found != index_.end()) EvictLocked(found->second);
  while (stats_.bytes + bytes > max_bytes_) {
    EvictLocked(std::prev(lru_.end()));
    ++stats_.evictions;
  }
  lru_.push_front(std::move(entry));
  index_.emplace(lru_.front()->hash, lru_.begin());
  ++length_counts_[tokens.size()];
  stats_.bytes += bytes;
  stats_.entries = lru_.size();
  return true;
}

std::optional<StateCache::Hit> StateCache::Lookup(std::span<const int32_t> tokens, bool count) {
  // Every prefix's hash, in one pass outside the lock.
  std::vector<uint64_t> prefix_hashes(tokens.size());
  uint64_t hash = 0;
  for (size_t i = 0; i < tokens.size(); ++i) prefix_hashes[i] = hash = NextHash(hash, tokens[i]);

  EntryPtr entry;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    // Longest first: the first verified match is the answer.
    auto it = length_counts_.upper_bound(tokens.size());
    while (it != length_counts_.begin() && !entry) {
      const size_t length = (--it)->first;
      const auto found = index_.find(prefix_hashes[length - 1]);
      if (found == index_.end()) continue;
      const Entry& candidate = **found->second;
      if (candidate.tokens.size() == length &&
          std::equal(candidate.tokens.begin(), candidate.tokens.end(), tokens.begin())) {
        lru_.splice(lru_.begin(), lru_, found->second);  // now the most recently used
        entry = *found->second;
      }
    }
    if (count) ++(entry ? stats_.hits : stats_.misses);
    if (!entry) return std::nullopt;
  }
  // The copy of the state, the slow part, without the lock; `entry` keeps it alive.
  return Hit{entry->tokens.size(), entry->state, entry->logits};
}

StateCache::Stats StateCache::stats() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return stats_;
}

void StateCache::EvictLocked(LruList::iterator it) {
  stats_.bytes -= (*it)->bytes;
  index_.erase((*it)->hash);
  if (const auto count = length_counts_.find((*it)->tokens.size()); --count->second == 0) {
    length_counts_.erase(count);
  }
  lru_.erase(it);
  stats_.entries = lru_.size();
}

}  // namespace aviary::serve
