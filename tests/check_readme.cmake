# Fails unless README.md's first ```cpp block is examples/readme/main.cpp,
# character for character, so the example the README shows is one that builds
# and runs under ctest (example_readme).
#
#   cmake -DREADME=<README.md> -DEXAMPLE=<examples/readme/main.cpp> -P check_readme.cmake
file(READ "${README}" readme)
file(READ "${EXAMPLE}" example)
string(FIND "${readme}" "```cpp\n" begin)
if(begin EQUAL -1)
  message(FATAL_ERROR "${README} has no ```cpp block; its usage example should be ${EXAMPLE}")
endif()
math(EXPR begin "${begin} + 7")
string(SUBSTRING "${readme}" ${begin} -1 rest)
string(FIND "${rest}" "```" end)
if(end EQUAL -1)
  message(FATAL_ERROR "${README}: the first ```cpp block is never closed")
endif()
string(SUBSTRING "${rest}" 0 ${end} block)
if(NOT block STREQUAL example)
  file(WRITE "${CMAKE_CURRENT_BINARY_DIR}/readme-block.cpp" "${block}")
  message(FATAL_ERROR "README.md's first ```cpp block differs from ${EXAMPLE}; compare with "
                      "diff ${CMAKE_CURRENT_BINARY_DIR}/readme-block.cpp ${EXAMPLE} and make them equal")
endif()
string(REGEX MATCHALL "\n" lines "${block}")
list(LENGTH lines count)
if(count GREATER 24)
  message(FATAL_ERROR "README.md's usage example has ${count} lines; keep it at 24 or fewer (one screen)")
endif()
message(STATUS "README.md's usage example is ${EXAMPLE} (${count} lines)")
