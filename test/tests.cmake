# The test list: one lce_add_test(NAME <name> SOURCES <source>... [GPU]) call per test executable.
