#include <cstdio>
#include <lce/version.hpp>

static_assert(LCE_VERSION_MAJOR == EXPECTED_MAJOR && LCE_VERSION_MINOR == EXPECTED_MINOR &&
                  LCE_VERSION_PATCH == EXPECTED_PATCH,
              "lce/version.hpp disagrees with the installed package version");

int main() {
  std::printf("lce %s\n", LCE_VERSION_STRING);
  return 0;
}
