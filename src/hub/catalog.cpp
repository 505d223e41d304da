#include "hub/catalog.h"

#include <array>
#include <cstdlib>
#include <filesystem>
#include <system_error>

#include "aviary/cache.h"
#include "aviary/error.h"

namespace aviary::hub {
namespace {

// Where these facts come from (none could be checked against Hugging Face from the machine this
// was written on: it has no route to huggingface.co):
//  - File names, sizes and SHA-256 of every RWKV-7, RWKV-6, RWKV-5, RWKV-4 World and Raven entry:
//    RWKV-Runner's model manifest (github.com/josStorer/RWKV-Runner, manifest.json at commit
//    64269f0a5f8f6a77ae24c538dcbd8330bb41fee0), which lists each file's Hugging Face
//    downloadUrl, size and SHA256. The G1 file names also appear in rwkv7.c's README and
//    BlinkDL/RWKV-LM's Research/rwkv7-g0-7.2b.md; the RWKV-7 World names in rwkv7.c's README.
//  - RWKV-4 Pile: file names from ChatRWKV's and RWKV-LM's scripts, text-generation-webui's
//    RWKV docs and keras-nlp's presets; SHA-256 from one third-party loader (the "ml-pretrained"
//    RWKV module, which checks them after download). Sizes unknown: X-Linked-Size decides.
// A pull compares the catalog's size and checksum with Hugging Face's X-Linked-Size and
// X-Linked-ETag before downloading, so a stale entry fails at once instead of after the download.
constexpr std::array kCatalog = {
    // RWKV-7 "Goose", G-series (reasoning), BlinkDL/rwkv7-g1.
    CatalogEntry{"rwkv7-g1-0.1b", "RWKV-7 G1 0.1B", "BlinkDL/rwkv7-g1",
                 "rwkv7-g1-0.1b-20250307-ctx4096.pth", 382231495,
                 "854230983f1015407c44274a7a27196ed72007618995b7a7efba3c4a15f69a45", Vocab::kWorld},
    CatalogEntry{"rwkv7-g1-0.4b", "RWKV-7 G1 0.4B", "BlinkDL/rwkv7-g1",
                 "rwkv7-g1-0.4b-20250324-ctx4096.pth", 901779157,
                 "797e6393a980e7f6518d0f4e74dab4f4a01aff4e85d3bb2fe3d3efd23cf5d93a", Vocab::kWorld},
    CatalogEntry{"rwkv7-g1-1.5b", "RWKV-7 G1 1.5B", "BlinkDL/rwkv7-g1",
                 "rwkv7-g1-1.5b-20250429-ctx4096.pth", 3055445649,
                 "3a5ad5596ee90fd2eb98dfb946b7b6be30576dc973ac664a44e8e87a8c53f958", Vocab::kWorld},
    CatalogEntry{"rwkv7-g1-2.9b", "RWKV-7 G1 2.9B", "BlinkDL/rwkv7-g1",
                 "rwkv7-g1-2.9b-20250519-ctx4096.pth", 5896274653,
                 "163b76a041c4f69c115732404ac810f0feee354e4a01554f24c70ae5d2bfdbd6", Vocab::kWorld},
    CatalogEntry{"rwkv7-g1a2-1.5b", "RWKV-7 G1a2 1.5B", "BlinkDL/rwkv7-g1",
                 "rwkv7-g1a2-1.5b-20251005-ctx8192.pth", 3055445757,
                 "a1ebfc6e7c3059ce0e4b1823914c3d0e4e1cdb46aee6c97f775ea147ac7e4d4b", Vocab::kWorld},
    CatalogEntry{"rwkv7-g1a-2.9b", "RWKV-7 G1a 2.9B", "BlinkDL/rwkv7-g1",
                 "rwkv7-g1a-2.9b-20250924-ctx4096.pth", 5896274949,
                 "df5716263b617e7da83590446fb2a98b6663447cfd52e8e9b49e11ce7f4faa3e", Vocab::kWorld},
    CatalogEntry{"rwkv7-g0-7.2b", "RWKV-7 G0 7.2B", "BlinkDL/rwkv7-g1",
                 "rwkv7-g0-7.2b-20250722-ctx4096.pth", 14400009577,
                 "4064a881f9f17819de921db3de2ace9b228696f22e998be0c71211e7c2e487cf", Vocab::kWorld},
    CatalogEntry{"rwkv7-g0a2-7.2b", "RWKV-7 G0a2 7.2B", "BlinkDL/rwkv7-g1",
                 "rwkv7-g0a2-7.2b-20251005-ctx4096.pth", 14400009333,
                 "fc5373bc40a196a806dedb8bcf4e7700e0d7b385c0f79fee91322cf808384fef", Vocab::kWorld},
    // RWKV-7 World, BlinkDL/rwkv-7-world.
    CatalogEntry{"rwkv7-world-0.1b", "RWKV-7 World 0.1B v2.8", "BlinkDL/rwkv-7-world",
                 "RWKV-x070-World-0.1B-v2.8-20241210-ctx4096.pth", 382195690,
                 "60c98129b9529963bff2c164b8ab4bd17c19332ae06dc2dcae32aa3a3739295a", Vocab::kWorld},
    CatalogEntry{"rwkv7-world-0.4b", "RWKV-7 World 0.4B v2.9", "BlinkDL/rwkv-7-world",
                 "RWKV-x070-World-0.4B-v2.9-20250107-ctx4096.pth", 901794466,
                 "c08cf602b33e59a5717b8f0cafaf7f04c50c1c67166e477aa2f47c5ca180da4a", Vocab::kWorld},
    CatalogEntry{"rwkv7-world-1.5b", "RWKV-7 World 1.5B v3", "BlinkDL/rwkv-7-world",
                 "RWKV-x070-World-1.5B-v3-20250127-ctx4096.pth", 3055062345,
                 "23e13ff62ac6f80b28910ffc230324939e80ddb00b98f892a5951c0da071e700", Vocab::kWorld},
    CatalogEntry{"rwkv7-world-2.9b", "RWKV-7 World 2.9B v3", "BlinkDL/rwkv-7-world",
                 "RWKV-x070-World-2.9B-v3-20250211-ctx4096.pth", 5895796446,
                 "5d7901b91ef1646115db03d03d171370bca454061ad426a1256fda9e1c428cf8", Vocab::kWorld},
    // RWKV-6 "Finch" World, BlinkDL/rwkv-6-world.
    CatalogEntry{"rwkv6-world-1.6b", "RWKV-6 World 1.6B v2.1", "BlinkDL/rwkv-6-world",
                 "RWKV-x060-World-1B6-v2.1-20240328-ctx4096.pth", 3199845663,
                 "cda1f0ebe802e2859bfa129546372fd1eac60319111f215f65ced67dd334db36", Vocab::kWorld},
    CatalogEntry{"rwkv6-world-3b", "RWKV-6 World 3B v2.1", "BlinkDL/rwkv-6-world",
                 "RWKV-x060-World-3B-v2.1-20240417-ctx4096.pth", 6199859158,
                 "c7c4e68ea6d561661de0562c8f229e62668f9c2d804346a87ae28d6209cc4738", Vocab::kWorld},
    CatalogEntry{"rwkv6-world-7b", "RWKV-6 World 7B v3", "BlinkDL/rwkv-6-world",
                 "RWKV-x060-World-7B-v3-20241112-ctx4096.pth", 15271627549,
                 "ad2809d8f49d14711dee58541226d9a2c9a46e9cbc0b19279f031721ecf87906", Vocab::kWorld},
    CatalogEntry{"rwkv6-world-14b", "RWKV-6 World 14B v2.1", "BlinkDL/rwkv-6-world",
                 "RWKV-x060-World-14B-v2.1-20240719-ctx4096.pth", 28138429796,
                 "b65ad980b70833dbfab88c6894784cb0772ae15bd8850f23e7bc10334e785c06", Vocab::kWorld},
    // RWKV-5 "Eagle" World, BlinkDL/rwkv-5-world (0.1B v1 is v5.1; the v2 files are v5.2).
    CatalogEntry{"rwkv5-world-0.1b", "RWKV-5 World 0.1B v1", "BlinkDL/rwkv-5-world",
                 "RWKV-5-World-0.1B-v1-20230803-ctx4096.pth", 385598386,
                 "c844a3ee05bcb9065848cb05b10c48a3f381f5ac1953aad89e156ecdf31d7703", Vocab::kWorld},
    CatalogEntry{"rwkv5-world-0.4b", "RWKV-5 World 0.4B v2", "BlinkDL/rwkv-5-world",
                 "RWKV-5-World-0.4B-v2-20231113-ctx4096.pth", 923523954,
                 "5a288c54c7f30b0e2d4af23991133fad2af2d5e59ec7ad850ffe78054a5e4f92", Vocab::kWorld},
    CatalogEntry{"rwkv5-world-1.5b", "RWKV-5 World 1.5B v2", "BlinkDL/rwkv-5-world",
                 "RWKV-5-World-1B5-v2-20231025-ctx4096.pth", 3155590194,
                 "5a89f56be7f82ab9dd0835af9a6838f788477471616c02f7b041e3aea0c57435", Vocab::kWorld},
    CatalogEntry{"rwkv5-world-3b", "RWKV-5 World 3B v2", "BlinkDL/rwkv-5-world",
                 "RWKV-5-World-3B-v2-20231113-ctx4096.pth", 6126106674,
                 "a4bd430343c6fd138b85bbc68bb20262d3a2f053ea57dc4b41078269af68ff9c", Vocab::kWorld},
    CatalogEntry{"rwkv5-world-7b", "RWKV-5 World 7B v2", "BlinkDL/rwkv-5-world",
                 "RWKV-5-World-7B-v2-20240128-ctx4096.pth", 15036197526,
                 "a88c7274184b211e5545c8f992f0b80d03c40a447980bbfcd0f6d5858982615a", Vocab::kWorld},
    // RWKV-4 World, BlinkDL/rwkv-4-world.
    CatalogEntry{"rwkv4-world-0.1b", "RWKV-4 World 0.1B v1", "BlinkDL/rwkv-4-world",
                 "RWKV-4-World-0.1B-v1-20230520-ctx4096.pth", 385594610,
                 "a10ef99df2a8f8a6801edf4fc92a9c49bedd63dcb900d3e5667a2136b3d671e7", Vocab::kWorld},
    CatalogEntry{"rwkv4-world-0.4b", "RWKV-4 World 0.4B v1", "BlinkDL/rwkv-4-world",
                 "RWKV-4-World-0.4B-v1-20230529-ctx4096.pth", 923362866,
                 "4b4a2733cf5e5dc97dd62106f391d99895d16b11c5ccd10c89f28c52067a4919", Vocab::kWorld},
    CatalogEntry{"rwkv4-world-1.5b", "RWKV-4 World 1.5B v1", "BlinkDL/rwkv-4-world",
                 "RWKV-4-World-1.5B-v1-fixed-20230612-ctx4096.pth", 3155281586,
                 "71f0c3229f9227cbcb8ae5fee6461197129a57e26366c4d23a49058417b046c9", Vocab::kWorld},
    CatalogEntry{"rwkv4-world-3b", "RWKV-4 World 3B v1", "BlinkDL/rwkv-4-world",
                 "RWKV-4-World-3B-v1-20230619-ctx4096.pth", 6125597618,
                 "1b227af317fa25b6939ab3c7cd321226ca48b8fe4bbbd2df3db669f1482c54ba", Vocab::kWorld},
    CatalogEntry{"rwkv4-world-7b", "RWKV-4 World 7B v1", "BlinkDL/rwkv-4-world",
                 "RWKV-4-World-7B-v1-20230626-ctx4096.pth", 15035393586,
                 "db7b011247a0fe4389e1d76e3d6a904185f85d509c8a44ad18bf401094efc293", Vocab::kWorld},
    // RWKV-4 Raven (chat fine-tunes of Pile models; GPT-NeoX tokenizer), BlinkDL/rwkv-4-raven.
    CatalogEntry{"rwkv4-raven-1.5b", "RWKV-4 Raven 1.5B v12", "BlinkDL/rwkv-4-raven",
                 "RWKV-4-Raven-1B5-v12-Eng98%-Other2%-20230520-ctx4096.pth", 3030279730,
                 "6bbbffb3ee2372dfa9ef49c599e9a2bc0a01b94b6a264ba9bf5bd524fc38f723", Vocab::kNeox},
    CatalogEntry{"rwkv4-raven-3b", "RWKV-4 Raven 3B v12", "BlinkDL/rwkv-4-raven",
                 "RWKV-4-Raven-3B-v12-Eng98%-Other2%-20230520-ctx4096.pth", 5969345074,
                 "1eea1845acfe9729dfdaec66a8d1aeb91a1287d94bebbca5529c13c050540b33", Vocab::kNeox},
    CatalogEntry{"rwkv4-raven-7b", "RWKV-4 Raven 7B v12", "BlinkDL/rwkv-4-raven",
                 "RWKV-4-Raven-7B-v12-Eng98%-Other2%-20230521-ctx8192.pth", 14785389618,
                 "5a725eaeb9e09b724de6c97e6845dd0283097c7920acd05b46852ab7afa9ec32", Vocab::kNeox},
    CatalogEntry{"rwkv4-raven-14b", "RWKV-4 Raven 14B v12", "BlinkDL/rwkv-4-raven",
                 "RWKV-4-Raven-14B-v12-Eng98%-Other2%-20230523-ctx8192.pth", 28297309490,
                 "1193b5a9ceab572e4dbb9ed1d798eab7bf4793d18904d08bd4bf183579338ae7", Vocab::kNeox},
    // RWKV-4 Pile (base models; GPT-NeoX tokenizer), one repository per size.
    CatalogEntry{"rwkv4-pile-169m", "RWKV-4 Pile 169M", "BlinkDL/rwkv-4-pile-169m",
                 "RWKV-4-Pile-169M-20220807-8023.pth", 0,
                 "713c6f6137a08d3a86ab57df4f09ea03563329beb3bbabc23509d6c57aa0f9e2", Vocab::kNeox},
    CatalogEntry{"rwkv4-pile-430m", "RWKV-4 Pile 430M", "BlinkDL/rwkv-4-pile-430m",
                 "RWKV-4-Pile-430M-20220808-8066.pth", 0,
                 "261e6b8fef1c7c9e08a4dde31bf5caf8e79c4da38126d77977a4707de82a7f64", Vocab::kNeox},
    CatalogEntry{"rwkv4-pile-1.5b", "RWKV-4 Pile 1.5B", "BlinkDL/rwkv-4-pile-1b5",
                 "RWKV-4-Pile-1B5-20220929-ctx4096.pth", 0,
                 "6c97043e1bb0867368249290c97a2fe8ffc5ec12ceb1b5251f4ee911f9982c23", Vocab::kNeox},
    CatalogEntry{"rwkv4-pile-3b", "RWKV-4 Pile 3B", "BlinkDL/rwkv-4-pile-3b",
                 "RWKV-4-Pile-3B-20221110-ctx4096.pth", 0,
                 "9500633f23d86fbae3cb3cbe7908b97b971e9561edf583c2c5c60b10b02bcc27", Vocab::kNeox},
    CatalogEntry{"rwkv4-pile-7b", "RWKV-4 Pile 7B", "BlinkDL/rwkv-4-pile-7b",
                 "RWKV-4-Pile-7B-20230109-ctx4096.pth", 0,
                 "9ea1271b25deb6c72bd29f629147d5013cc7d7c69f9715192f6b6b92fca08f64", Vocab::kNeox},
    CatalogEntry{"rwkv4-pile-14b", "RWKV-4 Pile 14B", "BlinkDL/rwkv-4-pile-14b",
                 "RWKV-4-Pile-14B-20230313-ctx8192-test1050.pth", 0,
                 "9e1b9b44f2a98124d86fe35e298f230e3a4fa7b60431962da282817ae1b0bf32", Vocab::kNeox},
};

// Pinned to the commits that last changed each file in github.com/BlinkDL/ChatRWKV, so the
// bytes (and the checksums below) cannot move. Sizes and SHA-256 computed from a snapshot of
// that repository; they equal ../shared/tokenizers' copies, which the tests serve.
constexpr std::array kTokenizers = {
    TokenizerRelease{"world-vocab", "RWKV World vocabulary (65536 tokens)", Vocab::kWorld,
                     "rwkv_vocab_v20230424.txt",
                     "BlinkDL/ChatRWKV/02058ba0624a77c20f0913f83550835eb03a8db4/tokenizer/"
                     "rwkv_vocab_v20230424.txt",
                     1093733, "e6dee3d4e31b4d5c40ac99508ac6c701ceef4bed681bf2167ce9a908552bca89"},
    TokenizerRelease{"neox-20b-tokenizer", "GPT-NeoX 20B tokenizer (Pile, Raven)", Vocab::kNeox,
                     "20B_tokenizer.json",
                     "BlinkDL/ChatRWKV/b3a16eaf47370cface7bc77f7486fac1de8d6841/v2/"
                     "20B_tokenizer.json",
                     2467981, "56ac4821e129d2c520fdaba60abd920fa852ada51b45c0dd52bbb6bd8c985ade"},
};

std::string WithoutTrailingSlashes(std::string endpoint) {
  while (!endpoint.empty() && endpoint.back() == '/') endpoint.pop_back();
  return endpoint;
}

std::string EncodePath(std::string_view path) {  // keeps the '/' separators
  std::string out;
  size_t start = 0;
  while (true) {
    const size_t slash = path.find('/', start);
    out += EncodePathSegment(path.substr(start, slash - start));
    if (slash == std::string_view::npos) break;
    out += '/';
    start = slash + 1;
  }
  return out;
}

}  // namespace

std::span<const CatalogEntry> Catalog() { return kCatalog; }
std::span<const TokenizerRelease> TokenizerReleases() { return kTokenizers; }

const CatalogEntry* FindCatalogEntry(std::string_view name) {
  for (const CatalogEntry& e : kCatalog) {
    if (e.name == name) return &e;
  }
  return nullptr;
}

const CatalogEntry* FindCatalogEntryByFile(std::string_view file) {
  for (const CatalogEntry& e : kCatalog) {
    if (e.file == file) return &e;
  }
  return nullptr;
}

const TokenizerRelease* FindTokenizerRelease(std::string_view name) {
  for (const TokenizerRelease& t : kTokenizers) {
    if (t.name == name) return &t;
  }
  return nullptr;
}

const TokenizerRelease& TokenizerFor(Vocab vocab) {
  for (const TokenizerRelease& t : kTokenizers) {
    if (t.vocab == vocab) return t;
  }
  throw UsageError("no tokenizer file for this vocabulary");
}

std::string_view VocabName(Vocab vocab) {
  switch (vocab) {
    case Vocab::kWorld: return "world";
    case Vocab::kNeox: return "neox";
    case Vocab::kNone: break;
  }
  return "-";
}

std::string DownloadUrl(const CatalogEntry& entry, const HubSettings& hub) {
  return WithoutTrailingSlashes(hub.hf_endpoint) + "/" + EncodePath(entry.repo) + "/resolve/main/" +
         EncodePath(entry.file);
}

std::string DownloadUrl(const TokenizerRelease& tokenizer, const HubSettings& hub) {
  return WithoutTrailingSlashes(hub.raw_github_endpoint) + "/" + EncodePath(tokenizer.path);
}

std::string CachePath(const CatalogEntry& entry, const std::string& cache_dir) {
  return (std::filesystem::path(cache_dir) / std::string(entry.repo) / std::string(entry.file))
      .string();
}

std::string CachePath(const TokenizerRelease& tokenizer, const std::string& cache_dir) {
  return (std::filesystem::path(cache_dir) / "tokenizers" / std::string(tokenizer.file)).string();
}

std::optional<std::string> FindCachedModel(const CatalogEntry& entry,
                                           const std::string& cache_dir) {
  namespace fs = std::filesystem;
  std::error_code ec;
  std::optional<std::string> found;
  if (cache_dir.empty()) return std::nullopt;
  if (const std::string expected = CachePath(entry, cache_dir); fs::is_regular_file(expected, ec)) {
    found = expected;
  } else {
    found = FindInCache(std::string(entry.file), cache_dir);
  }
  if (!found) return std::nullopt;
  const uintmax_t size = fs::file_size(*found, ec);
  if (!ec && entry.size != 0 && size != entry.size) {
    throw Error(std::string(entry.name) + ": the cached file " + *found + " has " +
                std::to_string(size) + " bytes, expected " + std::to_string(entry.size) +
                "; run aviary pull " + std::string(entry.name) + " to download it again");
  }
  return found;
}

std::string EncodePathSegment(std::string_view segment) {
  static constexpr char kHex[] = "0123456789ABCDEF";
  std::string out;
  for (unsigned char c : segment) {
    const bool unreserved = (c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') ||
                            (c >= '0' && c <= '9') || c == '-' || c == '.' || c == '_' || c == '~';
    if (unreserved) {
      out += static_cast<char>(c);
    } else {
      out += '%';
      out += kHex[c >> 4];
      out += kHex[c & 15];
    }
  }
  return out;
}

}  // namespace aviary::hub
