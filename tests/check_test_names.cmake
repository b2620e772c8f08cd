# Fails when a Catch2 test name cannot round-trip through catch_discover_tests:
# Catch2 v2's discovery splits names at ';' and strips surrounding spaces, and
# Catch2 reads a '\' in the name ctest passes back as an escape, so the
# resulting ctest entries would match no test case.
#
#   cmake -DTEST_EXECUTABLE=<catch2 executable> -P check_test_names.cmake
execute_process(COMMAND "${TEST_EXECUTABLE}" --list-test-names-only OUTPUT_VARIABLE names RESULT_VARIABLE result)
if(result LESS 0)
  message(FATAL_ERROR "cannot list the tests of ${TEST_EXECUTABLE}: ${result}")
endif()
string(REPLACE ";" "<SEMICOLON>" names "${names}")
string(REPLACE "\n" ";" names "${names}")
set(bad)
foreach(name IN LISTS names)
  string(STRIP "${name}" stripped)
  string(FIND "${name}" "\\" backslash)
  if(name MATCHES "<SEMICOLON>" OR NOT name STREQUAL stripped OR NOT backslash EQUAL -1)
    string(REPLACE "<SEMICOLON>" ";" name "${name}")
    string(APPEND bad "\n  '${name}'")
  endif()
endforeach()
if(bad)
  message(FATAL_ERROR "These test names contain ';' or leading/trailing spaces, which ctest "
                      "discovery cannot represent; rename them:${bad}")
endif()
