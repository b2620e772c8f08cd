# Fails when a test file holds a [threads] test but is not among SOURCES, the files lora_thread_tests (the
# ThreadSanitizer build of .ci/run) is made of, so no thread test silently drops out of that run.
#
#   cmake -DSOURCES="a.cpp;b.cpp" -DTEST_DIR=<tests> -P check_thread_tests.cmake
cmake_minimum_required(VERSION 3.16)
file(GLOB files "${TEST_DIR}/unit-*.cpp" "${TEST_DIR}/noalloc-*.cpp")
foreach(file IN LISTS files)
  file(READ "${file}" text)
  string(FIND "${text}" "[threads]" at)
  if(NOT at EQUAL -1 AND NOT file IN_LIST SOURCES)
    message(FATAL_ERROR "${file} holds a [threads] test but is not in LORA_THREAD_TEST_SOURCES (tests/CMakeLists.txt)")
  endif()
endforeach()
message(STATUS "every [threads] test is in: ${SOURCES}")
