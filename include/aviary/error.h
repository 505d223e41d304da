// Errors cross the library boundary as exceptions carrying one line: "<what>: <problem>".
#pragma once

#include <stdexcept>
#include <string>

namespace aviary {

// Bad input: a malformed file, a wrong shape, an unknown token. The CLI exits with 1.
class Error : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// The caller used the API or the command line wrongly. The CLI exits with 2.
class UsageError : public Error {
 public:
  using Error::Error;
};

}  // namespace aviary
