// SHA-256 through OpenSSL's EVP interface: downloads are verified with it (hub/download.cpp) and
// training data caches are keyed by it (train/dataset.cpp).
#pragma once

#include <openssl/evp.h>

#include <cstddef>
#include <string>
#include <string_view>

#include "aviary/error.h"

namespace aviary {

class Sha256 {
 public:
  Sha256() : ctx_(EVP_MD_CTX_new()) {
    if (!Reset()) {
      EVP_MD_CTX_free(ctx_);
      throw Error("SHA-256 is not available from OpenSSL");
    }
  }
  ~Sha256() { EVP_MD_CTX_free(ctx_); }
  Sha256(const Sha256&) = delete;
  Sha256& operator=(const Sha256&) = delete;

  // Starts a new hash; false when OpenSSL cannot.
  bool Reset() { return ctx_ && EVP_DigestInit_ex(ctx_, EVP_sha256(), nullptr) == 1; }
  void Update(const void* data, size_t n) { EVP_DigestUpdate(ctx_, data, n); }
  void Update(std::string_view s) { Update(s.data(), s.size()); }
  // The digest as 64 lowercase hex digits; ends this hash (Reset starts another).
  std::string HexDigest() {
    unsigned char md[EVP_MAX_MD_SIZE];
    unsigned int len = 0;
    EVP_DigestFinal_ex(ctx_, md, &len);
    static constexpr char kHex[] = "0123456789abcdef";
    std::string hex;
    for (unsigned int i = 0; i < len; ++i) {
      hex += kHex[md[i] >> 4];
      hex += kHex[md[i] & 15];
    }
    return hex;
  }

 private:
  EVP_MD_CTX* ctx_;
};

}  // namespace aviary
