# Cuts README.md's C++ snippets out for tests/readme/<name>.cpp to build and run, so every snippet the README
# shows is compiled as written (README: each is built by a test).
#
#   cmake -DREADME=<README.md> -DOUT_DIR=<dir> -DNAMES="a;b" -P extract_snippets.cmake
#
# The first ```cpp block is the whole program examples/readme/main.cpp (check_readme.cmake). Every later one must
# be preceded, on the line just before its fence, by
#   <!-- built by tests/readme/<name>.cpp -->
# and is written to <OUT_DIR>/<name>.inc. Fails for a block without that line, a name given twice, and a name that
# is not in NAMES or a NAMES entry with no block: a snippet added to the README without a test, or a test whose
# snippet went, stops the build.
cmake_minimum_required(VERSION 3.16)
file(READ "${README}" text)
set(marker_re "<!-- built by tests/readme/([a-z_]+)\\.cpp -->\n```cpp\n$")
set(found "")
set(first ON)
while(1)
  string(FIND "${text}" "```cpp\n" at)
  if(at EQUAL -1)
    break()
  endif()
  string(SUBSTRING "${text}" 0 ${at} before)
  math(EXPR begin "${at} + 7")
  string(SUBSTRING "${text}" ${begin} -1 text)
  string(FIND "${text}" "\n```" end)
  if(end EQUAL -1)
    message(FATAL_ERROR "${README}: a ```cpp block is never closed")
  endif()
  math(EXPR end "${end} + 1")
  string(SUBSTRING "${text}" 0 ${end} block)
  string(SUBSTRING "${text}" ${end} -1 text)
  if(first)  # examples/readme/main.cpp
    set(first OFF)
    continue()
  endif()
  string(LENGTH "${before}" length)
  set(tail_length 80)
  if(length LESS tail_length)
    set(tail_length ${length})
  endif()
  math(EXPR tail_begin "${length} - ${tail_length}")
  string(SUBSTRING "${before}" ${tail_begin} -1 tail)
  string(SUBSTRING "${block}" 0 60 start)
  if(NOT "${tail}```cpp\n" MATCHES "${marker_re}")
    message(FATAL_ERROR "${README}: the ```cpp block beginning \"${start}\" has no "
                        "\"<!-- built by tests/readme/<name>.cpp -->\" line before it; every snippet needs a test")
  endif()
  set(name "${CMAKE_MATCH_1}")
  if(name IN_LIST found)
    message(FATAL_ERROR "${README}: two ```cpp blocks are built by tests/readme/${name}.cpp")
  endif()
  if(NOT name IN_LIST NAMES)
    message(FATAL_ERROR "${README}: the block beginning \"${start}\" names tests/readme/${name}.cpp, which "
                        "tests/CMakeLists.txt does not build (readme_snippets)")
  endif()
  list(APPEND found "${name}")
  file(WRITE "${OUT_DIR}/${name}.inc" "${block}")
endwhile()
foreach(name IN LISTS NAMES)
  if(NOT name IN_LIST found)
    message(FATAL_ERROR "${README} has no ```cpp block marked for tests/readme/${name}.cpp")
  endif()
endforeach()
