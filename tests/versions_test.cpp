// The version table and the weight-type table: every entry is complete and agrees with itself
// across formats (what synth writes is what the GGUF names cover and what detection finds).
#include <gtest/gtest.h>

#include <set>
#include <string>

#include "aviary/error.h"
#include "formats/gguf.h"
#include "formats/rwkvcpp_writer.h"
#include "models/synth.h"
#include "models/versions.h"
#include "tensor/dtype.h"

namespace {

using aviary::Arch;
using aviary::DType;
using aviary::VersionSpec;

TEST(Versions, EveryEntryIsCompleteAndFoundByItsNames) {
  std::set<Arch> seen;
  for (const VersionSpec& v : aviary::Versions()) {
    SCOPED_TRACE(std::string(v.name));
    EXPECT_TRUE(seen.insert(v.arch).second) << "two entries for one Arch";
    EXPECT_EQ(&aviary::Version(v.arch), &v);
    EXPECT_EQ(aviary::ArchName(v.arch), v.name);
    EXPECT_EQ(aviary::FindVersionByName(v.name), &v);
    for (std::string_view alias : v.aliases) EXPECT_EQ(aviary::FindVersionByName(alias), &v);
    EXPECT_FALSE(v.markers.empty());
    EXPECT_NE(v.make, nullptr);
    EXPECT_NE(v.from_blinkdl, nullptr);
    EXPECT_NE(v.synth_layer, nullptr);
    EXPECT_NE(v.gguf.write_keys, nullptr);
    EXPECT_FALSE(v.gguf.architecture.empty());
    EXPECT_FALSE(v.gguf.layer_names.empty());
  }
  EXPECT_EQ(aviary::FindVersionByName("8"), nullptr);
  EXPECT_EQ(aviary::FindVersion(static_cast<Arch>(99)), nullptr);
  EXPECT_THROW(aviary::Version(static_cast<Arch>(99)), aviary::Error);
}

// The tensors synth writes for a version are exactly those its GGUF names map, and detection
// finds that version from them.
TEST(Versions, SynthTensorsMatchTheGgufNamesAndDetection) {
  for (const VersionSpec& v : aviary::Versions()) {
    SCOPED_TRACE(std::string(v.name));
    aviary::SynthOptions o;
    o.arch = v.arch;
    o.n_layer = 2;
    o.n_embd = 64;
    o.n_vocab = 50;
    o.head_size = 16;
    std::set<std::string> written;
    for (const aviary::SynthTensor& t : aviary::PlanSynthModel(o)) written.insert(t.name);

    std::set<std::string> mapped;
    for (const aviary::gguf::NameMap& m : aviary::gguf::kGlobalNames) {
      mapped.insert(std::string(m.canonical));
    }
    for (int l = 0; l < o.n_layer; ++l) {
      const std::string b = "blocks." + std::to_string(l) + ".";
      for (const aviary::gguf::NameMap& m : v.gguf.layer_names) {
        if ((m.flags & aviary::gguf::kNotLayer0) && l == 0) continue;
        const std::string name = b + std::string(m.canonical);
        if (m.flags & aviary::gguf::kOptional) {
          if (!written.count(name)) continue;
        }
        mapped.insert(name);
      }
      for (std::string_view s : v.gguf.fused_mixes.slots) mapped.insert(b + std::string(s));
    }
    EXPECT_EQ(written, mapped);

    const VersionSpec* found =
        aviary::DetectVersion([&](const std::string& name) { return written.count(name) != 0; });
    EXPECT_EQ(found, &v);
  }
}

TEST(WeightTypes, FormatCodesRoundTrip) {
  for (int i = 0; i < aviary::kNumDTypes; ++i) {
    const DType t = static_cast<DType>(i);
    const aviary::DTypeTraits& traits = aviary::Traits(t);
    SCOPED_TRACE(std::string(traits.name));
    EXPECT_EQ(aviary::gguf::DTypeFromGgml(aviary::gguf::GgmlTypeOf(t)), t);
    EXPECT_EQ(aviary::gguf::GgmlTypeName(aviary::gguf::GgmlTypeOf(t)), traits.name);
    EXPECT_EQ(aviary::gguf::DTypeFromFileType(aviary::gguf::FileTypeOf(t)), t);
    if (traits.rwkvcpp_type >= 0) {
      EXPECT_EQ(aviary::RwkvCppTypeCode(t), traits.rwkvcpp_type);
    } else {
      EXPECT_THROW(aviary::RwkvCppTypeCode(t), aviary::Error);
    }
    EXPECT_EQ(aviary::StorageBytes(t, traits.block_elems), static_cast<size_t>(traits.block_bytes));
  }
}

}  // namespace
