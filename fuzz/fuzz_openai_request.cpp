// libFuzzer target: arbitrary bytes as the body of POST /v1/chat/completions, of
// POST /v1/completions and of POST /v1/states. The parsers promise never to throw; each answer must be a request within
// the limits or an error whose body is valid JSON naming a field it checked. Anything else (an
// exception, a sanitizer report, a timeout, a huge allocation) is a bug. Seeds: scripts/fuzz.sh.
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string_view>

#include <nlohmann/json.hpp>

#include "serve/openai_api.h"

namespace {

using aviary::serve::ApiError;
using aviary::serve::Limits;

// Small limits, so that the fuzzer reaches them.
const Limits kLimits{
    .max_body_bytes = 4096, .max_n = 4, .max_tokens = 256, .max_stop = 2, .max_json_depth = 16};

void Check(bool ok, const char* what) {
  if (!ok) {
    std::fprintf(stderr, "broken promise: %s\n", what);
    std::abort();
  }
}

void CheckError(const ApiError& e) {
  Check(e.status == 400 || e.status == 413, "an error status other than 400 or 413");
  Check(!e.message.empty(), "an error without a message");
  Check(nlohmann::json::accept(e.Json()), "an error body that is not JSON");
}

void CheckParams(const aviary::serve::GenerationParams& p) {
  Check(p.n >= 1 && p.n <= kLimits.max_n, "n out of range");
  Check(!p.max_tokens || (*p.max_tokens >= 1 && *p.max_tokens <= kLimits.max_tokens),
        "max_tokens out of range");
  Check(p.stop.size() <= static_cast<size_t>(kLimits.max_stop), "too many stop strings");
  for (const auto& s : p.stop) Check(!s.empty(), "an empty stop string");
  Check(!p.temperature || (*p.temperature >= 0 && *p.temperature <= 2), "temperature");
  Check(!p.top_p || (*p.top_p > 0 && *p.top_p <= 1), "top_p");
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string_view body(reinterpret_cast<const char*>(data), size);
  const auto chat = aviary::serve::ParseChatRequest(body, kLimits);
  if (const auto* e = std::get_if<ApiError>(&chat)) {
    CheckError(*e);
  } else {
    const auto& request = std::get<aviary::serve::ChatRequest>(chat);
    Check(!request.messages.empty(), "a chat request without input");
    CheckParams(request.params);
  }
  const auto completion = aviary::serve::ParseCompletionRequest(body, kLimits);
  if (const auto* e = std::get_if<ApiError>(&completion)) {
    CheckError(*e);
  } else {
    CheckParams(std::get<aviary::serve::CompletionRequest>(completion).params);
  }
  const auto state = aviary::serve::ParseStateRequest(body, kLimits);
  if (const auto* e = std::get_if<ApiError>(&state)) {
    CheckError(*e);
  } else {
    const std::string& id = std::get<aviary::serve::StateRequest>(state).id;
    Check(!id.empty() && id.size() <= 64 && id.find('/') == std::string::npos, "a bad state id");
  }
  return 0;
}
