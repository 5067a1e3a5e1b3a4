#include <cstdio>
#include <lce/version.hpp>

int main() {
  std::printf("lce %s\n", LCE_VERSION_STRING);
  return 0;
}
